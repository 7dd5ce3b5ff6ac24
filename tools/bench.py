"""Throughput of Embedder.encode against the reference stack, same weights, same texts, one run.

    python tools/bench.py --shape 0.6b --layers 4 --texts 384           # CPU, float32 (a few minutes)
    python tools/bench.py --shape 8b --texts 4096 --device cuda         # GPU, bfloat16
    python tools/bench.py --head --device cuda                          # the head phase at full MAP size

Weights are random at a real model's shape (--layers keeps CPU runs short: per-layer cost is what
matters). Texts: --data, a CSV in the MAP format rendered with train.py's default template (the
published figures used rows of the competition's train.csv); without it, generated texts of
similar lengths, and one line says so. Tokenizer: --tokenizer, a tokenizer.json (the published
figures used Qwen's real one, 151,643 byte-level BPE tokens, whose vocabulary sets the embedding
table); without it the tiny test tokenizer, and one line says so. Reported: texts/s, real tokens/s, padded
tokens per real token (the rows the matmuls process), peak memory, achieved FLOP/s over the matmul
peak measured in this run, and the max abs difference to our vectors.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a tool, run as tools/bench.py: the project's modules are one folder up

from at_scale.embedder import Embedder  # noqa: E402
from at_scale.runtime import default_batch_tokens, dtype_name, pick_device_dtype  # noqa: E402
from data import MAP_TEMPLATE, read_csv, render  # noqa: E402
from qwen_embed import Qwen3Config  # noqa: E402
from tools.random_checkpoint import SHAPES, make_checkpoint  # noqa: E402

def load_texts(n, csv_path=None, seed=0):
    if csv_path:
        texts = render(MAP_TEMPLATE, read_csv(csv_path)[1])
    else:  # similar lengths: a question, an answer and a short explanation
        print("no --data: generated texts of similar lengths (not the figures of a real CSV)")
        rng = random.Random(seed)
        words = "the fraction of shaded parts is one third because six over nine simplifies".split()
        texts = [f"Question: {' '.join(rng.choices(words, k=rng.randint(10, 40)))}\nAnswer: 1/3\n"
                 f"Student explanation: {' '.join(rng.choices(words, k=rng.randint(3, 40)))}" for _ in range(n)]
    rng = random.Random(seed)
    return [texts[i % len(texts)] for i in rng.sample(range(max(n, len(texts))), n)]


class PeakRSS:
    """Peak resident memory of this process above the level at entry, sampled every 2 ms."""

    def __enter__(self):
        self.base = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.delta = self.peak - self.base

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def matmul_peak(device, dtype, n=4096, reps=5):
    """FLOP/s of a large square matmul: the ceiling our model's matmuls can reach here."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_text(c: Qwen3Config, n_tokens):
    """Forward FLOPs for one text: 2 per weight per token in the matmuls, plus causal attention."""
    attn_w = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp_w = 3 * c.hidden_size * c.intermediate_size
    causal = 2 * 2 * c.num_attention_heads * c.head_dim * n_tokens * (n_tokens + 1) / 2  # QK^T and PV
    return c.num_hidden_layers * (2 * (attn_w + mlp_w) * n_tokens + causal)


def timed(name, fn, device):
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t = time.perf_counter()
        vecs = fn()
        sync(device)
        seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else mem.delta
    return {"name": name, "seconds": seconds, "vectors": vecs.float().cpu(), "peak_bytes": peak}


def write_checkpoint(args, folder, shape):
    """A random checkpoint at the shape, stored in --weights-dtype (bf16 as every Qwen3 release ships)."""
    t = time.perf_counter()
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if tokenizer is None:
        print("no --tokenizer: the tiny test tokenizer (token counts and vocabulary are not Qwen's)")
    make_checkpoint(folder, **shape, dtype=getattr(torch, args.weights_dtype),
                    **(dict(tokenizer=tokenizer, vocab_size=151669) if tokenizer else {}))
    for extra in ("tokenizer_config.json", "special_tokens_map.json") if tokenizer else ():
        if (tokenizer.parent / extra).is_file():
            shutil.copy(tokenizer.parent / extra, folder / extra)
    size = (folder / "model.safetensors").stat().st_size
    print(f"checkpoint: {args.shape} shape, {shape['layers']} layers, {size / 2**30:.2f} GiB {args.weights_dtype}, "
          f"written in {time.perf_counter() - t:.0f}s")
    return size


def measure_loading(folder, device, dtype, quantize, size):
    """Loading, in a fresh process so that its peak memory is its own."""
    load = subprocess.run([sys.executable, __file__, "--measure-load", str(folder), "--device", str(device),
                           "--dtype", dtype_name(dtype), "--quantize", quantize], capture_output=True, text=True)
    if load.returncode:
        raise SystemExit(load.stderr)
    load = json.loads(load.stdout)
    print(f"loading ({quantize}): {load['seconds']:.1f}s, peak host RAM {load['peak_bytes'] / 2**30:.2f} GiB "
          f"= {load['peak_bytes'] / size:.2f}x the checkpoint on disk")


def time_ours(args, folder, texts, device, dtype):
    """Ours at default settings (no batch arguments; compile by job size), first call and warm, then
    int8 and int4 weights, other token budgets and compile settings: how far the default is from the best."""
    ours = Embedder.from_pretrained(folder, device=device, dtype=dtype, quantize=args.quantize,
                                         max_memory=args.max_memory, log=print)
    encode = lambda **kw: ours.encode(texts, max_length=args.max_length, progress=False, **kw)
    first = timed("ours, defaults, first call", encode, device)
    runs = [dict(timed("ours, defaults", encode, device), padding=1.0)]
    print(f"ours, defaults: {default_batch_tokens(ours.model.config, device, dtype)} tokens per batch, compiled: "
          f"{ours.compiled}, weights {ours.weight_format}; first call {first['seconds']:.1f}s, warm "
          f"{runs[0]['seconds']:.1f}s")
    del ours
    variants = [(q, c) for q in ("none", "int8", "int4") for c in ((False,) if args.no_compiled_variants else (False, True))]
    for quantize, compiled in variants:
        model = Embedder.from_pretrained(folder, device=device, dtype=dtype, compile=compiled, quantize=quantize)
        budgets = args.budgets or ([1024, 2048, 4096, 8192] if device.type == "cpu" else [8192, 16384, 32768, 65536])
        for budget in budgets if quantize == "none" else budgets[:1]:
            run = lambda: model.encode(texts, max_length=args.max_length, progress=False, max_batch_tokens=budget)
            run()  # warm-up (compiles once per model)
            name = f"ours {quantize} {budget} tok{', compiled' if compiled else ''}"
            runs.append(dict(timed(name.replace(" none", ""), run, device), padding=1.0))
    return runs


def time_references(args, folder, texts, lengths, device, dtype):
    """transformers' model-card recipe and sentence-transformers, on the same weights and texts."""
    import transformers
    from sentence_transformers import SentenceTransformer
    real = sum(lengths)

    def padded_tokens(order, batch_size):  # rows a padded batch computes, over real tokens
        return sum(len(b) * max(lengths[i] for i in b) for b in
                   (order[s:s + batch_size] for s in range(0, len(order), batch_size))) / real

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()

    @torch.inference_mode()
    def naive(batch_size=args.batch_size):  # the model card's recipe, in input order
        out = []
        for s in range(0, len(texts), batch_size):
            b = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=args.max_length,
                    return_tensors="pt").to(device)
            out.append(F.normalize(ref(**b).last_hidden_state[:, -1].float(), dim=-1))
        return torch.cat(out)

    naive(4)
    runs = [dict(timed("transformers (naive)", naive, device),
                 padding=padded_tokens(list(range(len(texts))), args.batch_size))]
    del ref
    st = SentenceTransformer(str(folder), device=str(device), model_kwargs={"dtype": dtype})
    st.max_seq_length = args.max_length
    st.encode(texts[:4])
    by_length = sorted(range(len(texts)), key=lambda i: -lengths[i])
    for bs in [args.batch_size] + (args.extra_batch_sizes if device.type == "cuda" else []):
        runs.append(dict(timed(f"sentence-transformers bs={bs}",
                               lambda: st.encode(texts, batch_size=bs, convert_to_tensor=True), device),
                         padding=padded_tokens(by_length, bs)))
    return runs


def print_runs(runs, texts, real, flops, peak):
    print(f"\n{'method':34s} {'texts/s':>9s} {'real tok/s':>11s} {'pad/real':>9s} {'peak MiB':>9s} "
          f"{'MFU':>6s} {'max|diff|':>10s} {'min cos':>8s} {'ours/this':>10s}")
    base = runs[0]
    for r in runs:
        diff = (r["vectors"] - base["vectors"]).abs().max().item()
        cos = F.cosine_similarity(r["vectors"], base["vectors"], dim=-1).min().item()
        print(f"{r['name']:34s} {len(texts) / r['seconds']:9.1f} {real / r['seconds']:11.0f} {r['padding']:9.2f} "
              f"{r['peak_bytes'] / 2**20:9.0f} {flops / r['seconds'] / peak:6.1%} {diff:10.2e} {cos:8.5f} "
              f"{r['seconds'] / base['seconds']:10.2f}x")
    ours = {r["name"]: r["seconds"] for r in runs if r["name"].startswith("ours")}
    print(f"\nours at defaults: {min(ours.values()) / base['seconds']:.0%} of the speed of our best setting above")
    vectors = {r["name"]: r["vectors"] for r in runs}
    for name, seconds in ours.items():
        fmt = next((f for f in ("int8", "int4") if name.startswith(f"ours {f} ")), None)
        shipped = name.replace(f" {fmt}", "")
        if fmt and shipped in ours:
            cos = F.cosine_similarity(vectors[name], vectors[shipped], dim=-1)
            print(f"{fmt} weights: {ours[shipped] / seconds:.2f}x the speed of the weights as shipped "
                  f"({name.removeprefix(f'ours {fmt} ')}); cosine to them min {cos.min():.5f}, mean {cos.mean():.5f}")


def main(args):
    device, dtype = pick_device_dtype(args.device, args.dtype)
    torch.manual_seed(0)
    texts = load_texts(args.texts, args.data)
    shape = dict(SHAPES[args.shape], layers=args.layers or SHAPES[args.shape]["layers"])
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        size = write_checkpoint(args, folder, shape)
        for quantize in ("none", "int8", "int4"):
            measure_loading(folder, device, dtype, quantize, size)
        config = Qwen3Config.from_json(folder / "config.json")
        lengths = [len(ids) for ids in Embedder.from_pretrained(folder, device=device, dtype=dtype)
                   .tokenize(texts, max_length=args.max_length)]
        print(f"texts: {len(texts)}, real tokens {sum(lengths)}, median {sorted(lengths)[len(lengths) // 2]}, "
              f"max {max(lengths)}")
        peak = matmul_peak(device, dtype)
        print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
              f"{dtype_name(dtype)} matmul peak {peak / 1e9:.0f} GFLOP/s, torch {torch.__version__}")
        runs = time_ours(args, folder, texts, device, dtype)
        if not args.ours_only:
            runs += time_references(args, folder, texts, lengths, device, dtype)
        print_runs(runs, texts, sum(lengths), sum(flops_per_text(config, n) for n in lengths), peak)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_head(args):
    """The head phase at the MAP competition's full size (36,696 rows of 8B vectors, 65 classes),
    random vectors and labels, train.py's default head flags, K-fold cross-validation."""
    import fit
    import train
    device = pick_device_dtype(args.device)[0]
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(args.head_rows, args.head_dim, generator=g), dim=-1)
    y = torch.randint(args.head_classes, (args.head_rows,), generator=g)
    labels = [f"c{i}" for i in range(args.head_classes)]
    flags = train.parse_args(["--folds", str(args.head_folds), "--epochs", str(args.head_epochs),
                              "--head-device", str(device)])
    t = time.perf_counter()
    task = train.Task(labels, y, [labels[i] for i in y.tolist()], torch.arange(len(y)), y[:0], None)
    fit.cross_validate(flags, x, task, quiet=True)
    sync(device)
    seconds, epochs = time.perf_counter() - t, args.head_folds * args.head_epochs
    print(f"head: {args.head_rows} x {args.head_dim} vectors, {args.head_classes} classes, {args.head_folds} folds x "
          f"{args.head_epochs} epochs on {device}: {seconds:.1f}s, {seconds / epochs:.2f}s per epoch "
          f"(5 folds x 30 epochs: {150 * seconds / epochs:.0f}s)")


def measure_load(folder, device, dtype, quantize):
    with PeakRSS() as mem:
        t = time.perf_counter()
        Embedder.from_pretrained(folder, device=device, dtype=dtype, quantize=quantize)
        seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "peak_bytes": mem.delta}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (Qwen's for real token "
                   "counts); None: the tiny test one, said")
    p.add_argument("--data", default=None, help="a CSV in the MAP format; None: generated texts, "
                   "said")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the real model (default: all)")
    p.add_argument("--texts", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch of the references")
    p.add_argument("--budgets", type=int, nargs="*", default=None, help="our token budgets to try beside the "
                   "default (None: 1024-8192 on CPU, 8192-65536 on CUDA)")
    p.add_argument("--extra-batch-sizes", type=int, nargs="*", default=[128, 512], help="also tried on CUDA "
                   "for sentence-transformers")
    p.add_argument("--no-compiled-variants", action="store_true", help="try the budgets eagerly only")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="compute dtype; None: the device's default")
    p.add_argument("--weights-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="the checkpoint's dtype on disk (every Qwen3 release ships bf16)")
    p.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default="auto", help="ours at defaults: "
                   "how the weights are kept (int8 and as shipped are both timed after it)")
    p.add_argument("--max-memory", type=float, default=None, help="memory budget in GB for --quantize auto")
    p.add_argument("--ours-only", action="store_true", help="skip the reference stack")
    p.add_argument("--measure-load", default=None, help=argparse.SUPPRESS)
    h = p.add_argument_group("--head: time the head phase instead of embedding")
    h.add_argument("--head", action="store_true")
    h.add_argument("--head-rows", type=int, default=36696)
    h.add_argument("--head-dim", type=int, default=4096)
    h.add_argument("--head-classes", type=int, default=65)
    h.add_argument("--head-folds", type=int, default=5)
    h.add_argument("--head-epochs", type=int, default=30)
    a = p.parse_args()
    if a.head:
        bench_head(a)
    elif a.measure_load:
        measure_load(a.measure_load, *pick_device_dtype(a.device, a.dtype), a.quantize)
    else:
        main(a)
