"""The embedding cache: vectors on disk, so that changing only the head never runs the LLM again.

    CACHE_DIR/<spec hash>/spec.json               what the vectors depend on, readable
    CACHE_DIR/<spec hash>/chunk-*.safetensors     keys (n, 32) uint8 = sha256 of each text,
                                                  vectors (n, D) float32

The spec hash covers everything that changes a vector: the checkpoint's identity (config, tokenizer,
the size and first and last MiB of each weights file), instruction, max_length, pooling, dim, dtype,
weight format (int8) and layer; the text itself is the per-row key. One forward pass fills every
(pooling, layer) spec a run asks for. A chunk is written every chunk_size texts or chunk_seconds
(15 s), whichever comes first, to a temporary name and renamed: a run killed at any moment loses at
most that much work, and a rerun computes only what is missing. Ctrl-C saves what was computed. More
than COMPACT_AT chunk files are merged into one at the end of a run. Two runs may share a cache
folder: nothing is locked, files are only ever added whole or deleted once their vectors are in
another file. Reading fills one (rows, D) matrix with the rows asked for, and only those.
Under torchrun (`torchrun --nproc_per_node=N train.py ...`) the ranks share the missing texts
(torchrun.py).
"""

import contextlib
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import safe_open, save_file
from tqdm.auto import tqdm

import runtime
import torchrun
import weights
from data import DiskFullError, atomic_path
from qwen_embed import NonFiniteError, Qwen3Config, Qwen3Embedder, checkpoint_tensors, reference_vectors
from runtime import TextTooLongError

MIB = 1 << 20
COMPACT_AT = 8  # chunk files in one cache folder before they are merged into one
FIDELITY_WARN = 0.99  # min cosine against as shipped under which a quantized run warns
PENDING_BYTES = 256 * MIB  # vectors held before a write, at most: with 76 specs of 4096-d, 215 texts


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


def runs(indices):
    """Sorted indices -> (start, stop) ranges of consecutive ones: what a file is read by."""
    out = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, i + 1])
    return out


class Cache:
    """One spec's folder of chunk files."""

    def __init__(self, cache_dir, spec):
        self.spec = spec
        self.dir = Path(cache_dir) / hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def files(self):
        """The chunk files, listed again until no new one appears: a chunk that another run merged
        away while we looked is skipped (read() returns None), and the merged file read instead."""
        for tmp in self.dir.glob(".chunk-*"):  # a chunk half-written by a run killed an hour ago or more
            if time.time() - tmp.stat().st_mtime > 3600:
                shutil.rmtree(tmp, ignore_errors=True)
        seen = set()
        while True:
            new = [f for f in sorted(self.dir.glob("chunk-*.safetensors")) if f not in seen]
            if not new:
                return
            seen.update(new)
            yield from new

    def read(self, file, dim):
        """A chunk's keys as a list of bytes, checked against the header (vectors not read), or None
        if it is gone or corrupt (then deleted, and its texts recomputed)."""
        try:
            with safe_open(file, framework="pt") as f:
                keys, vectors = f.get_tensor("keys"), f.get_slice("vectors")
                ok = (keys.dtype == torch.uint8 and keys.ndim == 2 and keys.shape[1] == 32
                      and vectors.get_dtype() == "F32" and vectors.get_shape() == [len(keys), dim])
        except FileNotFoundError:
            return None
        except Exception:
            ok = False
        if not ok:
            self.corrupt(file)
            return None
        return [bytes(k) for k in keys.numpy()]

    def corrupt(self, file, why=""):
        print(f"warning: {file}: corrupt cache chunk{why}, deleted; its texts will be recomputed")
        file.unlink(missing_ok=True)

    def present(self, dim):
        """The set of text keys this spec has vectors for."""
        found = set()
        for file in self.files():
            found.update(self.read(file, dim) or ())
        return found

    def load(self, keys, dim):
        """(len(keys), dim) float32, row i the vector of text key keys[i]: one matrix, filled in
        place, reading from each chunk only the rows asked for."""
        want = {}
        for i, k in enumerate(keys):
            want.setdefault(k, []).append(i)
        out = torch.empty(len(keys), dim)
        for file in self.files():
            if not want:
                break
            hits = {j: want.pop(k) for j, k in enumerate(self.read(file, dim) or ()) if k in want}
            self.read_rows(file, hits, out)
        if want:
            raise FileNotFoundError(f"{self.dir}: {len(want)} vectors vanished from the cache while reading "
                                    f"(another run deleting its files?); run again")
        return out

    def read_rows(self, file, hits, out, rows_per_read=4096):
        """out[rows] = row j of the chunk's vectors, for each j: rows in hits, by runs of consecutive
        chunk rows, at most rows_per_read at a time (so a merged file is never read whole at once)."""
        with safe_open(file, framework="pt") as f:
            vectors = f.get_slice("vectors")
            for a, b in runs(sorted(hits)):
                for start in range(a, b, rows_per_read):
                    block = vectors[start:min(b, start + rows_per_read)]
                    if not torch.isfinite(block).all():
                        self.corrupt(file, " (NaN or Inf)")
                        raise FloatingPointError(f"{file}: NaN or Inf in a cache chunk; deleted, run again to "
                                                 f"recompute its texts")
                    src = [j - start for j in range(start, start + len(block)) for _ in hits[j]]
                    dst = [i for j in range(start, start + len(block)) for i in hits[j]]
                    out[dst] = block[src]

    def info(self):
        """spec.json as written: the spec, and what was measured beside it (not hashed: fidelity)."""
        try:
            return json.loads((self.dir / "spec.json").read_text())
        except (OSError, ValueError):
            return dict(self.spec)

    def note(self, extra):
        """Add measured figures to spec.json, beside the spec (the hash is the spec's alone)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / "spec.json") as tmp:
            tmp.write_text(json.dumps({**self.info(), **extra, **self.spec}, indent=2))

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
        files = list(self.files())
        if len(files) <= max_files:
            return
        keys, read = [], []
        for file in files:
            chunk = self.read(file, dim)
            if chunk is not None:
                keys += chunk
                read.append(file)
        keys = list(dict.fromkeys(keys))  # each text once
        merged = self.load(keys, dim)
        path = self.save(torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(len(keys), 32), merged)
        for file in read:
            if file != path:
                file.unlink(missing_ok=True)


class Vectors:
    """One (pooling, layer)'s vectors of a run's texts, on disk until loaded."""

    def __init__(self, cache, keys, dim):
        self.cache, self.keys, self.dim = cache, keys, dim

    def load(self, rows=None):
        """(len(rows), D) float32 for the given row indices (None: every text), read from disk."""
        return self.cache.load(self.keys if rows is None else [self.keys[i] for i in rows], self.dim)


class ChunkWriter:
    """Vectors computed but not yet on disk, written as one chunk file per spec: after the first
    batch (the time before it went to loading and compiling), then every chunk_size texts or
    chunk_seconds, and before PENDING_BYTES of vectors pile up."""

    def __init__(self, caches, keys, dim, chunk_size, chunk_seconds):
        self.caches, self.keys, self.chunk_seconds = caches, keys, chunk_seconds
        self.max_rows = max(1, min(chunk_size, PENDING_BYTES // (len(caches) * dim * 4)))
        self.pending, self.saved, self.last = [], 0, time.monotonic()

    def add(self, rows, vectors):  # rows: indices into keys; vectors: {spec: (len(rows), D)}
        self.pending.append((rows, vectors))
        if not self.saved or sum(len(r) for r, _ in self.pending) >= self.max_rows or \
                time.monotonic() - self.last >= self.chunk_seconds:
            self.flush()

    def flush(self):  # a kill at any moment leaves whole files only
        if self.pending:
            rows = [r for b, _ in self.pending for r in b]
            for spec, cache in self.caches.items():
                cache.save(self.keys[rows], torch.cat([v[spec] for _, v in self.pending]))
            self.saved += len(rows)
            self.pending.clear()
        self.last = time.monotonic()


# ----------------------------------------------------------------------------- embedding through the cache

def embed(texts, model, *, pooling="last", layers=(None,), **kw):
    """{layer: (len(texts), D) float32} for one pooling, through the cache (ensure_cached's
    arguments); None on a torchrun rank other than 0."""
    stored = ensure_cached(texts, model, poolings=(pooling,), layers=layers, **kw)
    return None if stored is None else {layer: stored[pooling, layer].load() for layer in layers}


def ensure_cached(texts, model, *, poolings=("last",), layers=(None,), instruction=None, max_length=8192, dim=None,
                  device=None, dtype=None, quantize="auto", max_memory=None, batch_size=None, max_batch_tokens=None,
                  compile=None, cache_dir=".cache/embeddings", chunk_size=1024, chunk_seconds=15, progress=True,
                  fidelity_texts=64, eos=True, log=print, ids=None):
    """Put every (pooling, layer) vector of every text in the cache, computing the missing ones in
    ONE forward pass, and return {(pooling, layer): Vectors}: handles that read one matrix each.

    layers: None = the final normed output, else layer indexes as in Qwen3Embedder.encode.
    ids: a name per text (row ids) for error messages. eos=False: no EOS appended (tokenize's
    append_eos), a spec of its own. quantize is decided here, once, for the run
    (weights.choose_format); with int8 or int4, fidelity_texts of the texts embedded are measured
    against the weights as shipped (measure_fidelity), and the figures kept in the cache's
    spec.json. Under torchrun every rank embeds a share of
    the missing texts, balanced by tokens; rank 0 gets the handles, the others None.
    """
    if fidelity_texts < 0:
        raise ValueError(f"--fidelity-texts must be 0 (skip) or positive, got {fidelity_texts}")
    for flag, value in (("--cache-chunk", chunk_size), ("--cache-seconds", chunk_seconds),
                        ("--batch-size", batch_size), ("--max-batch-tokens", max_batch_tokens)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    rank, world, local = torchrun.distributed(runtime.pick_device(device))  # before anything touches a GPU
    device, dtype = runtime.pick_device_dtype(device, dtype)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local)  # one GPU per process
    if rank:  # logs and progress bars from rank 0 only
        log, progress = (lambda *_: None), False
    folder = runtime.resolve_model_dir(model)
    config = Qwen3Config.from_json(folder / "config.json")
    keys = layer_keys(config, layers, dim)
    tensors = checkpoint_tensors(folder)
    budget = max_batch_tokens or runtime.room_batch_tokens(config, device, dtype, any(k is not None for k in keys))
    fmt, why = weights.choose_format(quantize, tensors, config, dtype, budget, runtime.memory_budget(device, max_memory))
    base = {"checkpoint": checkpoint_identity(folder), "model": str(model), "instruction": instruction,
            "max_length": max_length, "dim": dim, "dtype": runtime.dtype_name(dtype)}
    # as shipped keeps the caches of before int8; int8 is named with its group (per-row int8 came before)
    base.update({"weights": f"{fmt}-g{weights.GROUP}"} if fmt != "none" else {})
    base.update({} if eos else {"eos": False})  # with EOS, the caches of before --no-eos stay valid
    caches = {(p, k): Cache(cache_dir, {**base, "pooling": p, "layer": k}) for p in poolings for k in dict.fromkeys(keys)}
    D = dim or config.hidden_size
    text_key = [bytes(k) for k in text_keys(texts).numpy()]
    todo, n_missing = missing(caches.values(), text_key, D)
    torchrun.barrier(world)  # every rank has read the same cache before any rank writes to it
    if not todo:
        log(f"embeddings: all {len(texts)} vectors found in the cache, no forward pass")
    else:
        log(f"embeddings: {len(texts) - n_missing} cached, computing {len(todo)} with {model} on {device} in "
            f"{runtime.dtype_name(dtype)}" + (f", {world} processes" if world > 1 else ""))
        say_size(len(todo), len(texts), caches, D, cache_dir, weights.weight_bytes(tensors, fmt, dtype)
                 + weights.batch_room(config, tensors, dtype, budget), log)
        log(why)
        embedder = Qwen3Embedder.load(folder, config, device, dtype, fmt, compile, str(model))
        found = compute(embedder, [texts[i] for i in todo], [text_key[i] for i in todo], caches, D, rank, world,
                        lambda bad: [ids[i] if ids else i for i, t in enumerate(texts) if t in bad], log, progress,
                        instruction=instruction, max_length=max_length, batch_size=batch_size,
                        max_batch_tokens=max_batch_tokens, chunk_size=chunk_size, chunk_seconds=chunk_seconds,
                        fidelity_texts=fidelity_texts * (fmt != "none") * (rank == 0), eos=eos)
        for cache in caches.values() if found else ():
            cache.note({"fidelity": found})
        del embedder  # the model's memory is free before anything reads the vectors
    torchrun.barrier(world)  # all chunks written
    if rank:
        return None
    for cache in caches.values():
        try:
            cache.compact(D)
        except DiskFullError as e:  # the chunks are all there: merging them is only tidiness
            log(f"warning: {e}; the cache keeps its chunk files (merged by a later run)")
    return {(p, layer): Vectors(caches[p, k], text_key, D) for p in poolings for layer, k in zip(layers, keys)}


def fidelity_sample(n_texts, n, seed=0):
    """The indices of the texts a run measures its quantized vectors on: a seeded sample."""
    return sorted(random.Random(seed).sample(range(n_texts), min(n, n_texts)))


def measure_sample(embedder, texts, n, log, **spec):
    """measure_fidelity on a seeded sample of n texts, encoding them here (the LoRA paths, which
    cache no vectors); None for weights as shipped or n = 0."""
    if embedder.weight_format == "none" or not n:
        return None
    return measure_fidelity(embedder, [texts[i] for i in fidelity_sample(len(texts), n)], log, **spec)


def measure_fidelity(embedder, texts, log, vectors=None, **spec):
    """Per-text cosine between the quantized embedder's vectors of texts (vectors, if the run has
    computed them already, else encoded here) and the weights as shipped (qwen_embed.reference_vectors),
    one line saying what it found, a warning below FIDELITY_WARN. spec: instruction, max_length,
    pooling, layer, dim, append_eos. Returns {"format", "texts", "min", "mean", "seconds"}."""
    t0 = time.time()
    if vectors is None:
        vectors = embedder.encode(texts, spec.get("instruction"), max_length=spec.get("max_length", 8192),
                                  dim=spec.get("dim"), pooling=spec.get("pooling", "last"), progress=False,
                                  layers=[spec.get("layer")], append_eos=spec.get("append_eos", True))[spec.get("layer")]
    cos = (vectors * reference_vectors(embedder, texts, **spec)).sum(-1)
    found = {"format": embedder.weight_format, "texts": len(texts), "min": round(cos.min().item(), 5),
             "mean": round(cos.mean().item(), 5), "seconds": round(time.time() - t0, 1)}
    log(f"{found['format']} vs as shipped on {found['texts']} of these texts: cosine min {found['min']:.4f}, "
        f"mean {found['mean']:.4f} (reference read one layer at a time, {found['seconds']:.0f} s)")
    if found["min"] < FIDELITY_WARN:
        wider = "int8" if found["format"] == "int4" else "none"
        log(f"warning: {found['format']} moves some vectors by more than cosine {FIDELITY_WARN}: --quantize {wider} "
            f"keeps them closer, if memory allows (--max-memory, a larger machine)")
    return found


def layer_keys(config, layers, dim):
    """Layers as cached (-1 and num_hidden_layers share an entry), after one-line checks."""
    hidden, n = config.hidden_size, config.num_hidden_layers
    if dim is not None and not 1 <= dim <= hidden:
        raise ValueError(f"--dim must be between 1 and the model's hidden size {hidden}, got {dim}")
    bad = [layer for layer in layers if layer is not None and not -n - 1 <= layer <= n]
    if bad:
        raise ValueError(f"--layer must be between {-n - 1} and {n} for this {n}-layer model, got {bad[0]}")
    return [None if layer is None else layer % (n + 1) for layer in layers]


def missing(caches, text_key, dim):
    """(first row of each distinct text that some cache lacks, rows lacking). One cache's key set
    is held at a time."""
    lacking = set()
    for cache in caches:
        present = cache.present(dim)
        lacking.update(i for i, k in enumerate(text_key) if k not in present)
    first = {}
    for i in sorted(lacking):
        first.setdefault(text_key[i], i)
    return list(first.values()), len(lacking)


def size(n_bytes):
    """Bytes for a person: MB under a GB, GB above."""
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes < runtime.GB else f"{n_bytes / runtime.GB:.2f} GB"


def say_size(n_todo, n_texts, caches, dim, cache_dir, model_bytes, log):
    """One line on what the run will write and hold, before any work; a disk that cannot take it
    is a one-line error."""
    disk = n_todo * len(caches) * (dim * 4 + 32)
    where = Path(cache_dir).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if disk > free:
        raise ValueError(f"--cache-dir {cache_dir}: the vectors need {size(disk)} ({n_todo} texts x "
                         f"{len(caches)} (pooling, layer) x {dim} x 4 B) and the disk has {size(free)} free")
    pending = min(PENDING_BYTES, n_todo * len(caches) * dim * 4)
    log(f"cache: {n_todo} texts x {len(caches)} (pooling, layer) x {dim} x 4 B = {size(disk)} on disk; "
        f"memory while embedding about {(model_bytes + pending) / runtime.GB:.1f} GB (the model and a batch, "
        f"{pending / runtime.GB:.2f} GB of vectors before each write); after it, "
        f"{n_texts * dim * 4 / runtime.GB:.2f} GB per (pooling, layer) loaded")


def compute(embedder, texts, keys, caches, dim, rank, world, rows_of, log, progress, *, instruction, max_length,
            batch_size, max_batch_tokens, chunk_size, chunk_seconds, fidelity_texts=0, eos=True):
    """Embed texts (this rank's share of them) in one pass for every cache's (pooling, layer),
    writing chunks as it goes. keys: their text keys; rows_of(texts) names the rows holding them.
    fidelity_texts: measure that many of the vectors just computed against the weights as shipped
    (measure_fidelity) and return its figures (else None)."""
    tokens = embedder.tokenize(texts, instruction, max_length, eos)  # once: the shares and the batches use it
    mine = torchrun.balance([len(t) for t in tokens], world)[rank] if world > 1 else list(range(len(texts)))
    writer = ChunkWriter(caches, torch.tensor([list(keys[j]) for j in mine], dtype=torch.uint8).reshape(-1, 32),
                         dim, chunk_size, chunk_seconds)
    sample, first = fidelity_sample(len(mine), fidelity_texts), next(iter(caches))
    wanted, kept = set(sample), {}  # the sample's vectors of the first (pooling, layer), as they pass
    t0 = time.time()
    with tqdm(total=len(mine), desc="embedding", unit="text", disable=not progress) as bar:
        try:
            for batch, vectors in embedder.stream([tokens[j] for j in mine], list(caches), dim, True, batch_size,
                                                  max_batch_tokens, log=bar.write):
                writer.add(batch, vectors)
                kept.update({i: vectors[first][j] for j, i in enumerate(batch) if i in wanted})
                bar.update(len(batch))
            writer.flush()
        except NonFiniteError as e:  # that batch is not cached; name the rows, not positions
            writer.flush()
            rows = rows_of({texts[mine[i]] for i in e.indices})
            raise FloatingPointError(f"NaN or Inf in the vectors of rows {rows[:20]}"
                                     f"{' ...' if len(rows) > 20 else ''}; nothing of them was cached") from None
        except TextTooLongError as e:
            writer.flush()
            raise MemoryError(f"row {rows_of({texts[mine[e.index]]})[0]}: its {e.tokens} tokens do not fit in GPU "
                              f"memory even alone; the {writer.saved} vectors computed so far are cached; lower "
                              f"--max-length") from None
        except DiskFullError as e:
            left = len(mine) - writer.saved
            raise DiskFullError(f"{e}. {writer.saved} of the {len(mine)} vectors to compute are cached; the other "
                                f"{left} need {left * len(caches) * (dim * 4 + 32) / 1e6:.1f} MB more: free that "
                                f"much and run again to resume") from None
        finally:  # Ctrl-C and SIGTERM too: what was computed is kept (where the disk has room)
            with contextlib.suppress(DiskFullError):
                writer.flush()
    if world > 1:
        every = torchrun.gather((rank, len(mine), sum(len(tokens[j]) for j in mine), time.time() - t0), world)
        for r, n_texts, n_tokens, seconds in every:
            log(f"rank {r}: {n_texts} texts, {n_tokens} tokens, {seconds:.1f}s")
    if sample:
        return measure_fidelity(embedder, [texts[mine[i]] for i in sample], log, torch.stack([kept[i] for i in sample]),
                                instruction=instruction, max_length=max_length, pooling=first[0], layer=first[1],
                                append_eos=eos,
                                dim=dim if dim != embedder.dim else None)
    return None
