"""The embedding cache: vectors on disk, so that changing only the head never runs the LLM again.

    CACHE_DIR/<spec hash>/spec.json               what the vectors depend on, readable
    CACHE_DIR/<spec hash>/chunk-*.safetensors     keys (n, 32) uint8 = sha256 of each text,
                                                  vectors (n, D) float32

The spec hash covers everything that changes a vector: the checkpoint's identity (config, tokenizer,
the size and first and last MiB of each weights file), instruction, max_length, pooling, dim, dtype
and layer; the text itself is the per-row key. A chunk is written every chunk_size texts or every
chunk_seconds (15 s), whichever comes first, to a temporary name and renamed: a run killed at any
moment loses at most that much work, and a rerun computes only what is missing. Ctrl-C saves what
was computed. More than COMPACT_AT chunk files are merged into one at the end of a run. Two runs
may share a cache folder: nothing is locked, files are only ever added whole or deleted once their
vectors are in another file. Under torchrun (`torchrun --nproc_per_node=N train.py ...`) the ranks
share the missing texts.
"""

import argparse
import atexit
import hashlib
import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import safe_open, save_file
from tqdm.auto import tqdm

from data import atomic_path
from qwen_embed import (NonFiniteError, Qwen3Config, Qwen3Embedder, TextTooLongError, pick_device_dtype,
                        resolve_model_dir)

MIB = 1 << 20
COMPACT_AT = 8  # chunk files in one cache folder before they are merged into one


def checkpoint_identity(folder):
    """A fingerprint of a checkpoint folder, cheap even for 16 GB of weights."""
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        h.update((folder / name).read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = file.stat().st_size
            h.update(f"{file.name}:{size}".encode())
            h.update(f.read(MIB))
            f.seek(max(0, size - MIB))
            h.update(f.read(MIB))
    return h.hexdigest()


def text_keys(texts):
    return torch.tensor([list(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest()) for t in texts],
                        dtype=torch.uint8).reshape(len(texts), 32)


class Cache:
    def __init__(self, cache_dir, spec):
        self.spec = spec
        self.dir = Path(cache_dir) / hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def load(self, dim):
        """{text key bytes: vector}. A chunk that is unreadable, or whose shapes, dtypes or values
        are wrong, is deleted (and its texts recomputed) rather than trusted. A chunk that another
        run merged away while we looked is skipped, and the merged file read instead."""
        for tmp in self.dir.glob(".chunk-*"):  # a chunk half-written by a run killed an hour ago or more
            if time.time() - tmp.stat().st_mtime > 3600:
                shutil.rmtree(tmp, ignore_errors=True)
        found, seen = {}, set()
        while True:
            files = [f for f in sorted(self.dir.glob("chunk-*.safetensors")) if f not in seen]
            if not files:
                return found
            for file in files:
                seen.add(file)
                chunk = self.read(file, dim)
                if chunk is not None:
                    found.update(zip(map(bytes, chunk[0].numpy()), chunk[1]))

    def read(self, file, dim):
        """(keys, vectors) of one chunk file, or None if it is gone or corrupt (then deleted)."""
        try:
            with safe_open(file, framework="pt") as f:
                keys, vectors = f.get_tensor("keys"), f.get_tensor("vectors")
            ok = (keys.dtype == torch.uint8 and keys.ndim == 2 and keys.shape[1] == 32
                  and vectors.dtype == torch.float32 and vectors.shape == (len(keys), dim)
                  and bool(torch.isfinite(vectors).all()))
        except FileNotFoundError:
            return None
        except Exception:
            ok = False
        if not ok:
            print(f"warning: {file}: corrupt cache chunk, deleted; its texts will be recomputed")
            file.unlink(missing_ok=True)
            return None
        return keys, vectors

    def save(self, keys, vectors):
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_file = self.dir / "spec.json"
        if not spec_file.exists():
            with atomic_path(spec_file) as tmp:
                tmp.write_text(json.dumps(self.spec, indent=2))
        name = hashlib.sha256(keys.numpy().tobytes()).hexdigest()[:16]
        path = self.dir / f"chunk-{name}.safetensors"
        with atomic_path(path) as tmp:
            save_file({"keys": keys.contiguous(), "vectors": vectors.contiguous()}, str(tmp))
        return path

    def compact(self, dim, max_files=COMPACT_AT):
        """Merge the chunk files into one once there are more than max_files, so that many small
        (time-limited) chunks never slow a later load. Safe against a kill: the merged file is in
        place before any chunk is deleted, and duplicates are harmless. Safe against another run
        on the same cache: only files whose vectors are in the merged file are deleted."""
        files = sorted(self.dir.glob("chunk-*.safetensors"))
        if len(files) <= max_files:
            return
        merged, read = {}, []
        for file in files:
            chunk = self.read(file, dim)
            if chunk is not None:
                merged.update(zip(map(bytes, chunk[0].numpy()), chunk[1]))
                read.append(file)
        keys = torch.tensor([list(k) for k in merged], dtype=torch.uint8).reshape(len(merged), 32)
        path = self.save(keys, torch.stack(list(merged.values())) if merged else torch.empty(0, dim))
        for file in read:
            if file != path:
                file.unlink(missing_ok=True)


def add_flags(p):
    """The speed and cache flags that train.py and evaluate.py share (None: chosen by the device and
    the job, as in Qwen3Embedder); run_options(args) turns them into embed()'s arguments."""
    p.add_argument("--batch-size", type=int, default=None, help="texts per forward pass, at most; None: no limit "
                   "but the token budget")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per forward pass, at most; None: "
                   "2048 on CPU, on CUDA from the free GPU memory and the model's shape")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the "
                   "model's blocks; None: when the texts to embed hold 100,000 tokens or more")
    p.add_argument("--cache-dir", default=".cache/embeddings", help="embedding cache shared by train.py and evaluate.py")
    p.add_argument("--cache-chunk", type=int, default=1024, help="texts embedded between cache writes, at most")
    p.add_argument("--cache-seconds", type=float, default=15, help="seconds of embedding between cache writes, "
                   "at most (or one batch, if longer): what a kill can lose")


def run_options(args):
    return dict(batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, compile=args.compile,
                cache_dir=args.cache_dir, chunk_size=args.cache_chunk, chunk_seconds=args.cache_seconds,
                progress=not args.quiet)


def distributed(device):
    """(rank, world size, local rank) under torchrun, starting PyTorch's process group once;
    (0, 1, 0) in a plain run. One GPU per process and NCCL when embedding on CUDA, else gloo
    between CPU processes (also on a machine that has GPUs, with --device cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
            if per_node > gpus:  # before any work, rather than "invalid device ordinal" from deep inside
                raise ValueError(f"{per_node} processes on this node but {gpus} GPU(s): use "
                                 f"--nproc_per_node={gpus} or fewer, or --device cpu")
            torch.cuda.set_device(local)
        # Ranks wait for each other at the end of embedding, which can take hours on one slow rank.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=12))
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), world, local


def balance(token_counts, world):
    """Deal items to ranks, longest first, each to the rank with the fewest tokens so far."""
    shares, totals = [[] for _ in range(world)], [0] * world
    for i in sorted(range(len(token_counts)), key=lambda i: -token_counts[i]):
        r = totals.index(min(totals))
        shares[r].append(i)
        totals[r] += token_counts[i]
    return shares


def embed(texts, model, *, instruction=None, max_length=8192, pooling="last", dim=None, layers=(None,),
          device=None, dtype=None, batch_size=None, max_batch_tokens=None, compile=None,
          cache_dir=".cache/embeddings", chunk_size=1024, chunk_seconds=15, progress=True, log=print, ids=None):
    """Vectors for texts, from the cache where present, else computed and cached chunk by chunk.

    layers: which hidden states to pool: None = the final normed output, else layer indexes as in
    Qwen3Embedder.encode; one forward pass serves them all. Returns {layer: (len(texts), D) tensor}.
    ids: a name per text (row ids) for error messages. batch_size, max_batch_tokens, compile: as in
    Qwen3Embedder (None: by the device and the job).
    Under torchrun every rank embeds a share of the missing texts, balanced by tokens; rank 0 gets
    the vectors, the other ranks get None once all chunks are written.
    """
    for flag, value in (("--cache-chunk", chunk_size), ("--cache-seconds", chunk_seconds),
                        ("--batch-size", batch_size), ("--max-batch-tokens", max_batch_tokens)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    device, dtype = pick_device_dtype(device, dtype)
    rank, world, local = distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local)  # one GPU per process
    if rank:  # logs and progress bars from rank 0 only
        log, progress = (lambda *_: None), False
    folder = resolve_model_dir(model)
    config = Qwen3Config.from_json(folder / "config.json")
    hidden, n = config.hidden_size, config.num_hidden_layers
    if dim is not None and not 1 <= dim <= hidden:
        raise ValueError(f"--dim must be between 1 and the model's hidden size {hidden}, got {dim}")
    bad = [layer for layer in layers if layer is not None and not -n - 1 <= layer <= n]
    if bad:
        raise ValueError(f"--layer must be between {-n - 1} and {n} for this {n}-layer model, got {bad[0]}")
    wanted = layers
    layers = [None if layer is None else layer % (n + 1) for layer in layers]  # -1 and n share a cache entry
    identity = checkpoint_identity(folder)
    caches = {layer: Cache(cache_dir, {"checkpoint": identity, "model": str(model), "instruction": instruction,
                                       "max_length": max_length, "pooling": pooling, "dim": dim,
                                       "dtype": str(dtype).removeprefix("torch."), "layer": layer})
              for layer in layers}
    keys = text_keys(texts)
    key_bytes = [bytes(k) for k in keys.numpy()]
    found = {layer: cache.load(dim or hidden) for layer, cache in caches.items()}
    missing = [i for i, k in enumerate(key_bytes) if any(k not in f for f in found.values())]
    first = {}  # one computation per distinct text
    for i in missing:
        first.setdefault(key_bytes[i], i)
    todo = list(first.values())
    if world > 1:
        dist.barrier()  # every rank has read the same cache before any rank writes to it
    if not todo:
        log(f"embeddings: all {len(texts)} vectors found in the cache, no forward pass")
    else:
        log(f"embeddings: {len(texts) - len(missing)} cached, computing {len(todo)} with {model} "
            f"on {device} in {str(dtype).removeprefix('torch.')}" + (f", {world} processes" if world > 1 else ""))
        embedder = Qwen3Embedder.from_pretrained(folder, device=device, dtype=dtype, compile=compile)
        tokens = [len(t) for t in embedder.tokenize([texts[i] for i in todo], instruction, max_length)]
        mine = balance(tokens, world)[rank] if world > 1 else list(range(len(todo)))
        embedder.maybe_compile(sum(tokens[j] for j in mine), log)
        t0 = time.time()
        pending, saved, last_save = [], 0, time.monotonic()

        def save_pending():  # one chunk file per layer; a kill at any moment leaves whole files only
            nonlocal saved, last_save
            if pending:
                rows = [todo[mine[j]] for b, _ in pending for j in b]
                for layer, cache in caches.items():
                    vectors = torch.cat([v[layer] for _, v in pending])
                    cache.save(keys[rows], vectors)
                    found[layer].update(zip((key_bytes[i] for i in rows), vectors))
                saved += len(rows)
                pending.clear()
            last_save = time.monotonic()

        def rows_of(positions):  # positions in mine -> row ids of every row with those texts
            bad = {texts[todo[mine[j]]] for j in positions}
            return [ids[i] if ids else i for i, t in enumerate(texts) if t in bad]

        with tqdm(total=len(mine), desc="embedding", unit="text", disable=not progress) as bar:
            try:
                for batch, vectors in embedder.stream([texts[todo[j]] for j in mine], instruction, batch_size,
                                                      max_length, dim, pooling=pooling, layers=list(layers),
                                                      max_batch_tokens=max_batch_tokens, log=bar.write):
                    pending.append((batch, vectors))
                    bar.update(len(batch))
                    # The first batch is saved at once: the time before it went to loading and compiling.
                    if not saved or sum(len(b) for b, _ in pending) >= chunk_size or \
                            time.monotonic() - last_save >= chunk_seconds:
                        save_pending()
            except NonFiniteError as e:  # that batch is not cached; name the rows, not positions
                save_pending()
                rows = rows_of(e.indices)
                raise FloatingPointError(f"NaN or Inf in the vectors of rows {rows[:20]}"
                                         f"{' ...' if len(rows) > 20 else ''}; nothing of them was cached") from None
            except TextTooLongError as e:
                save_pending()
                raise MemoryError(f"row {rows_of([e.index])[0]}: its {e.tokens} tokens do not fit in GPU memory "
                                  f"even alone; the {saved} vectors computed so far are cached; lower "
                                  f"--max-length") from None
            finally:  # Ctrl-C too: what was computed is kept
                save_pending()
        if world > 1:
            summary = (rank, len(mine), sum(tokens[j] for j in mine), time.time() - t0)
            every = [None] * world
            dist.all_gather_object(every, summary)
            for r, n_texts, n_tokens, seconds in every:
                log(f"rank {r}: {n_texts} texts, {n_tokens} tokens, {seconds:.1f}s")
    if world > 1:
        dist.barrier()  # all chunks written
        if rank:
            return None
        found = {layer: cache.load(dim or hidden) for layer, cache in caches.items()}
    for cache in caches.values():
        cache.compact(dim or hidden)
    return {w: torch.stack([found[layer][k] for k in key_bytes]) for w, layer in zip(wanted, layers)}
