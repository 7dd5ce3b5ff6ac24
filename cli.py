"""The command-line shell of train.py and evaluate.py: the flags they share (where and how the
model runs, the cache), and cli(), which runs a main so that bad input ends in one line, not a
traceback, and Ctrl-C or SIGTERM ends a run with what it computed kept.

    if __name__ == "__main__":
        cli(main, parse_args)
"""

import argparse
import os
import signal
import sys
from contextlib import contextmanager

from at_scale import weights
from at_scale.embed_cache import RunOptions
from data import DiskFullError


sink = print  # where log() writes: logging_to(...) points it elsewhere for one run


def log(line):
    """A run's one logger: every line train.py and its research modes say goes through here."""
    sink(line)


@contextmanager
def logging_to(where):
    """log() writes to where (a function of one line) for the duration (tests collect the lines)."""
    global sink
    sink, before = where, sink
    try:
        yield
    finally:
        sink = before


def cli(main, parse_args, argv=None):
    """Run train.py's or evaluate.py's main: bad input ends in one line on stderr and a non-zero
    exit, not a traceback. SIGTERM (how Slurm, a preemptible VM, a notebook ending or `docker stop`
    ends a job) is handled as Ctrl-C is: what was computed is cached, one line, exit 143; a second
    SIGTERM ends the process at once. Under torchrun only rank 0 prints (errors still reach stderr
    from every rank)."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.stdout = open(os.devnull, "w")
    stopped = []

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one is not caught
        stopped.append(signum)
        raise KeyboardInterrupt  # unwinds as Ctrl-C does: pending vectors written, temp files gone

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return main(parse_args(argv))
    except (ValueError, FileNotFoundError, FloatingPointError, MemoryError, DiskFullError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # train.py adds how far the head phase got
        print(f"{'terminated (SIGTERM)' if stopped else 'interrupted'}: "
              f"{str(e) or 'the vectors computed so far are cached; run again to resume'}",
              file=sys.stderr)
        sys.exit(128 + signal.SIGTERM if stopped else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_given(parser, argv=None):
    """parser.parse_args(argv), with .given: {dest: flag} of every flag the command line names, even
    at its default value (parsed a second time with no defaults), so that a mode can refuse a flag
    it would ignore or override instead of dropping it without a word."""
    args = parser.parse_args(argv)
    defaults = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        named = vars(parser.parse_args(argv))
    finally:
        for action, default in defaults:
            action.default = default
    words = [w.split("=")[0] for w in (sys.argv[1:] if argv is None else argv)]
    args.given = {a.dest: next((f for f in a.option_strings if f in words), a.option_strings[0])
                  for a in parser._actions if a.dest in named and a.option_strings}
    return args


def refuse_given(args, dests, mode, why):
    """One line, before any work, if the command line names a flag of dests that mode would
    ignore or override (why: 'ignores' or 'sets itself')."""
    named = [flag for dest, flag in getattr(args, "given", {}).items() if dest in dests]
    if named:
        them = "it" if len(named) == 1 else "them"
        raise ValueError(f"{mode} {why} {', '.join(named)}: drop {them}")


def check_ranges(checks):
    """(flag, value, ok, what it must be) for each numeric flag: the first one not ok is a one-line
    error, before any work."""
    for flag, value, ok, must in checks:
        if not ok:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise ValueError(f"{flag} must be {must}, got {shown}")


def add_flags(p, quantize_default="auto"):
    """The flags that train.py and evaluate.py share: where and how the model runs (None: chosen by
    the device and the job, as in Qwen3Embedder) and the cache; run_options(args) turns them into
    the RunOptions of embed_cache.ensure_cached (--quantize is the EmbedSpec's weights)."""
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps ...; None: cuda, else mps, else cpu")
    p.add_argument("--quantize", choices=["auto", *weights.FORMATS], default=quantize_default,
                   help="how the weights are kept: none = as shipped (bf16), int8 = group-wise "
                   "int8 (8.5 bits per weight), int4 = group-wise int4 with the embedding table "
                   "and v_proj in int8 (about 4.9); auto: the first of none, int8, int4 that fits "
                   "the memory budget" +
                   ("" if quantize_default else "; None: the checkpoint's"))
    p.add_argument("--fidelity-texts", type=int, default=64, help="with int8 or int4 weights, "
                   "embed this many of the run's texts with the weights as shipped too (read one "
                   "layer at a time) and report the cosine between the two; 0: skip")
    p.add_argument("--max-memory", type=float, default=None, help="memory budget in GB for "
                   "--quantize; None: free memory on the GPU, available RAM on the CPU (shared by "
                   "torchrun's ranks on a node; each has a GPU of its own)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="texts per forward pass, at most; None: no limit but the token budget")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per forward pass, "
                   "at most; None: 2048 off CUDA (fewer when every layer is kept), on CUDA from "
                   "the free memory and the model's shape")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model's blocks; None: never on the CPU (measured not to "
                   "pay), on CUDA when the texts to embed hold 100,000 tokens or more")
    p.add_argument("--cache-dir", default=".cache/embeddings",
                   help="embedding cache shared by train.py and evaluate.py")
    p.add_argument("--cache-chunk", type=int, default=1024,
                   help="texts embedded between cache writes, at most")
    p.add_argument("--cache-seconds", type=float, default=15, help="seconds of embedding between "
                   "cache writes, at most (or one batch, if longer): what a kill can lose")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_options(args):
    """The shared flags as embed_cache.RunOptions (which checks them)."""
    return RunOptions(device=args.device, max_memory=args.max_memory, batch_size=args.batch_size,
                      max_batch_tokens=args.max_batch_tokens, compile=args.compile,
                      cache_dir=args.cache_dir, chunk_size=args.cache_chunk,
                      chunk_seconds=args.cache_seconds, fidelity_texts=args.fidelity_texts,
                      progress=not args.quiet)
