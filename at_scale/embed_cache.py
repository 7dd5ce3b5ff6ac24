"""The embedding cache: vectors on disk, so that changing only the head never runs the LLM again.

    CACHE_DIR/<spec hash>/spec.json               what the vectors depend on, readable
    CACHE_DIR/<spec hash>/chunk-*.safetensors     keys (n, 32) uint8 = sha256 of each text,
                                                  vectors (n, D) float32

What changes a vector is an EmbedSpec (model, instruction, max_length, pooling, layer, dim, dtype,
weight format, EOS); its hash, with a cheap identity of the checkpoint (config, tokenizer, the size
and first and last MiB of each weights file), names the folder, and the text itself is the per-row
key. Each chunk file records what the folder name cannot see (fingerprint.py): the code that
computed it, found from the code, and the content of every byte of the weights. Where and how the
vectors are computed (RunOptions) never enters the hash. One forward pass fills every (pooling,
layer) a run asks for. A chunk is written every chunk_size texts or chunk_seconds (15 s), whichever
comes first, to a temporary name and renamed: a run killed at any moment loses at most that much
work, and a rerun computes only what is missing. Ctrl-C saves what was computed. More than
COMPACT_AT chunk files are merged into one at the end of a run. Two runs may share a cache folder:
nothing is locked, files are only ever added whole or deleted once their vectors are in another
file. Reading fills one (rows, D) matrix with the rows asked for, and only those. Under torchrun
(`torchrun --nproc_per_node=N train.py ...`) the ranks share the missing texts (torchrun.py).
"""

import contextlib
import dataclasses
import hashlib
import json
import random
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import safe_open, save_file
from tqdm.auto import tqdm

from at_scale import fingerprint, runtime, torchrun, weights
from at_scale.embedder import Embedder, NonFiniteError, layer_keys, silent
from at_scale.runtime import TextTooLongError
from data import DiskFullError, atomic_path
from qwen_embed import POOLINGS, Qwen3Config, resolve_model_dir

MIB = 1 << 20
COMPACT_AT = 8  # chunk files in one cache folder before they are merged into one
FIDELITY_WARN = 0.99  # min cosine against as shipped under which a quantized run warns
HEARTBEAT_SECONDS = 60  # a phase this long says how far it got, once per this many seconds
PENDING_BYTES = 256 * MIB  # vectors held before a write, at most: 215 texts x 76 specs of 4096-d


# ------------------------------------------------------------------------- what a vector depends on

@dataclass(frozen=True)
class EmbedSpec:
    """What a vector depends on, besides its text and the checkpoint's files: equal specs, equal
    vectors. dtype None and weights "auto" are requests; a run decides them once (decide) and the
    decided spec is the one hashed for the cache and saved as meta.json's "embedding"."""
    model: str  # a Hub repo id or a checkpoint folder, as the user named it
    instruction: str | None = None  # Qwen3-Embedding's "Instruct: ...\nQuery:" prefix
    max_length: int = 8192  # tokens per text, EOS included
    pooling: str = "last"  # the last (EOS) token's state, or the mean of the tokens'
    layer: int | None = None  # None: the final normed output; else a layer's raw state
    dim: int | None = None  # keep the first dim features (Matryoshka); None: all
    dtype: str | None = None  # compute dtype; None: the device's default
    weights: str = field(default="auto", metadata={  # none (as shipped), int8, int4; auto: the
        "neutral": "none", "form": lambda w: f"{w}-g{weights.GROUP}"})  # first that fits
    eos: bool = True  # append <|endoftext|>, whose state "last" pools

    # The fields the first cache hashed, whatever their value; a field added since enters the key
    # only away from its neutral value, so that adding one leaves every cache of before valid.
    FIRST_KEY = ("model", "instruction", "max_length", "pooling", "layer", "dim", "dtype")

    def __post_init__(self):  # what needs no checkpoint is checked here, before any work
        if self.max_length < 1 + self.eos:
            raise ValueError(f"--max-length must be at least {1 + self.eos} (one text token"
                             f"{' and EOS' * self.eos}), got {self.max_length}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"--dim must be positive, got {self.dim}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, "
                             f"got {self.pooling!r}")
        if self.weights not in ("auto", *weights.FORMATS):
            raise ValueError(f"--quantize must be auto or one of {weights.FORMATS}, "
                             f"got {self.weights!r}")

    @classmethod
    def from_meta(cls, embedding, source, recorded_beside=()):
        """The spec a checkpoint's meta.json saved (older ones lack weights and eos: weights as
        shipped, EOS appended). A key that is no field of this class nor one of recorded_beside
        (what the checkpoint keeps beside the spec) was written by no version of this code: it
        is refused, naming it, never dropped."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(embedding.keys() - fields - set(recorded_beside))
        if unknown:
            raise ValueError(f"{source}: the embedding records {unknown}, which this version of "
                             f"the code does not know (a checkpoint of newer code?)")
        return cls(**{"weights": "none", **{k: v for k, v in embedding.items() if k in fields}})

    def key(self, checkpoint):
        """What the cache hashes, derived from the fields: the ones of the first cache always, under
        the names and value forms they had, so that those caches stay valid; any later field only
        where it differs from its neutral value (its default, or metadata["neutral"]), in the form
        metadata["form"] gives. checkpoint: the folder's checkpoint_identity; layer as stored."""
        if self.dtype is None or self.weights == "auto":  # a request is not what made a vector
            raise RuntimeError(f"{self}: decide() the dtype and weights before hashing the spec")
        key = {"checkpoint": checkpoint}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.FIRST_KEY or value != f.metadata.get("neutral", f.default):
                key[f.name] = f.metadata.get("form", lambda v: v)(value)
        return key


@dataclass(frozen=True)
class Measured:
    """What a run found out about its vectors, recorded beside the spec in a checkpoint."""
    model_identity: str | None = None  # fingerprint.model_identity: every byte of the checkpoint
    fidelity: dict | None = None  # measure_fidelity's figures with int8 or int4 weights
    vectors_from: dict | None = None  # a head trained on a vectors file: what made them (below)


@dataclass(frozen=True)
class RunOptions:
    """Where and how the vectors are computed and saved: nothing here changes a vector."""
    device: str | None = None  # cpu, cuda, cuda:1, mps ...; None: cuda, else mps, else cpu
    max_memory: float | None = None  # GB that weights="auto" may fill; None: what is free
    batch_size: int | None = None  # texts per forward pass, at most
    max_batch_tokens: int | None = None  # tokens per forward pass; None: by device and model
    compile: bool | None = None  # torch.compile; None: when the job is big enough to repay it
    cache_dir: str = ".cache/embeddings"
    chunk_size: int = 1024  # texts embedded between cache writes, at most
    chunk_seconds: float = 15  # seconds of embedding between cache writes, at most
    fidelity_texts: int = 64  # int8 or int4: texts measured against the weights as shipped
    progress: bool = True

    def __post_init__(self):
        if self.fidelity_texts < 0:
            raise ValueError(f"--fidelity-texts must be 0 (skip) or positive, "
                             f"got {self.fidelity_texts}")
        limits = {"--cache-chunk": self.chunk_size, "--cache-seconds": self.chunk_seconds,
                  "--batch-size": self.batch_size, "--max-batch-tokens": self.max_batch_tokens,
                  "--max-memory": self.max_memory}
        for flag, value in limits.items():
            if value is not None and value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")


# ---------------------------------------------------------------------- embedding through the cache

def embed(texts, model, *, layers=None, ids=None, log=print, **kw):
    """{layer: (len(texts), D) float32} of one pooling, through the cache: ensure_cached for a
    Python caller, its keywords EmbedSpec's and RunOptions' fields; None on a torchrun rank > 0."""
    names = {f.name for f in dataclasses.fields(EmbedSpec)}
    spec = EmbedSpec(str(model), **{k: v for k, v in kw.items() if k in names})
    run = RunOptions(**{k: v for k, v in kw.items() if k not in names})
    stored = ensure_cached(texts, spec, run, layers=layers, ids=ids, log=log)
    return None if stored is None else {layer: v.load() for (_, layer), v in stored.items()}


def ensure_cached(texts, spec, run=RunOptions(), *, poolings=None, layers=None, ids=None,
                  log=print):
    """Put the vectors of every text for every (pooling, layer) in the cache, computing the
    missing ones in ONE forward pass, and return {(pooling, layer): Vectors}: handles that read
    one matrix each. poolings, layers: default the spec's own; layers="all": the final normed
    output (None) and every layer 0..num_hidden_layers. ids: a name per text, for errors.

    The spec's dtype and weight format are decided here, once for the run (decide); with int8 or
    int4, run.fidelity_texts of the texts embedded are measured against the weights as shipped
    (measure_fidelity), the figures kept in the cache's spec.json. Under torchrun each rank embeds
    a share of the missing texts, balanced by tokens; rank 0 gets the handles, the others None.
    """
    requested = spec.dtype
    rank, world, device = torchrun.distributed(runtime.pick_device(run.device))  # before GPU work
    if rank:  # logs and progress bars from rank 0 only
        log, run = silent, replace(run, progress=False, fidelity_texts=0)
    folder = resolve_model_dir(spec.model)
    config = Qwen3Config.from_json(folder / "config.json")
    if layers == "all":
        layers = [None, *range(config.num_hidden_layers + 1)]
    layers, poolings = layers or [spec.layer], poolings or [spec.pooling]
    keys = layer_keys(config, layers, spec.dim)
    spec, why, model_bytes = decide(spec, run, folder, config, device, keys)
    checkpoint, dim = checkpoint_identity(folder), spec.dim or config.hidden_size
    content = fingerprint.model_identity(folder, run.cache_dir, log)  # every byte, read once
    caches = {(p, k): Cache(run.cache_dir, replace(spec, pooling=p, layer=k).key(checkpoint),
                            content) for p in poolings for k in dict.fromkeys(keys)}
    text_key = [bytes(k) for k in text_keys(texts).numpy()]
    todo = missing(caches.values(), text_key, dim)
    say_code(caches.values(), todo, log)
    torchrun.barrier(world)  # every rank has read the same cache before any rank writes to it
    if not todo:
        log(f"embeddings: all {len(texts)} vectors found in the cache, no forward pass")
    else:
        distinct = len(set(text_key))  # both counts in distinct texts: they add up to it
        log(f"embeddings: {len(texts)} rows, {distinct} distinct texts: {distinct - len(todo)} "
            f"cached, computing {len(todo)} with {spec.model} "
            f"on {device} in {spec.dtype}" + (f", {world} processes" if world > 1 else ""))
        say_size(len(todo), len(texts), len(caches), dim, run.cache_dir, model_bytes, log)
        log(why)
        if spec.dtype == "float16":
            log(runtime.FLOAT16_LINE)
            float32 = Cache(run.cache_dir, replace(spec, dtype="float32").key(checkpoint), content)
            if requested is None and float32.dir.is_dir():  # a T4's default was float32 before
                log(f"float16 is this GPU's default now: computing afresh; the float32 vectors "
                    f"cached before stay valid for --dtype float32 ({float32.dir})")
        embedder = Embedder.load(folder, config, device, runtime.DTYPES[spec.dtype],
                                 spec.weights, run.compile, spec.model)
        found = compute(embedder, [texts[i] for i in todo], [text_key[i] for i in todo], caches,
                        spec, run, row_names(texts, ids), log)
        for cache in caches.values() if found else ():
            cache.note({"fidelity": found})
        embedder.fast.release(embedder.model)  # what compiling it holds goes with it
        del embedder  # the model's memory is free before anything reads the vectors
    torchrun.barrier(world)  # all chunks written
    if rank:
        return None
    compact(caches.values(), dim, log)
    return {(p, layer): Vectors(caches[p, k], text_key, dim, replace(spec, pooling=p, layer=layer),
                                content) for p in poolings for layer, k in zip(layers, keys)}


def say_code(caches, todo, log):
    """One line if vectors of other code or other weights were skipped, one if chunks from before
    the code's and the weights' fingerprints were recorded were used (Cache)."""
    other = [functions for cache in caches for functions in cache.other_code.values()]
    if other and todo:
        now = fingerprint.code_fingerprint()[1]
        changed = sorted({name for functions in other
                          for name in fingerprint.changed_code(functions, now)})
        log(f"the code that computes these vectors changed since they were cached "
            f"({', '.join(changed)}): computing afresh")
    if any(cache.other_weights for cache in caches) and todo:
        log("the checkpoint's weights changed since these vectors were cached (the same files, "
            "other content): computing afresh")
    legacy = sum(len(cache.legacy) for cache in caches)
    if legacy:
        log(f"note: {legacy} cache file(s) from before the code's and the weights' fingerprints "
            f"were recorded: used as they are (delete them to recompute with this code)")


def row_names(texts, ids):
    """rows_of(texts) -> the names of every row holding one of them (ids, else row indexes): what
    an error about a text says."""
    return lambda bad: [ids[i] if ids else i for i, t in enumerate(texts) if t in bad]


def decide(spec, run, folder, config, device, keys):
    """The spec's requests decided, once for the run: the compute dtype (None: the device's
    default) and the weight format ("auto": weights.choose_format, the first that fits the memory
    budget with room for a batch). Returns (decided spec, the line saying why that format, the
    bytes the model and a batch will hold)."""
    dtype = runtime.pick_device_dtype(device, spec.dtype)[1]
    tensors = weights.checkpoint_tensors(folder)
    budget = run.max_batch_tokens or runtime.room_batch_tokens(config, device, dtype,
                                                               any(k is not None for k in keys))
    fmt, why = weights.choose_format(spec.weights, tensors, config, dtype, budget,
                                     runtime.memory_budget(device, run.max_memory))
    held = (weights.weight_bytes(tensors, fmt, dtype)
            + weights.batch_room(config, tensors, dtype, budget))
    return replace(spec, dtype=runtime.dtype_name(dtype), weights=fmt), why, held


def missing(caches, text_key, dim):
    """The first row of each distinct text that some cache lacks. One cache's key set is held at
    a time."""
    lacking = set()
    for cache in caches:
        present = cache.present(dim)
        lacking.update(i for i, k in enumerate(text_key) if k not in present)
    first = {}
    for i in sorted(lacking):
        first.setdefault(text_key[i], i)
    return list(first.values())


def say_size(n_todo, n_texts, n_specs, dim, cache_dir, model_bytes, log):
    """One line on what the run will write and hold, before any work; a disk that cannot take it,
    or a (pooling, layer)'s vectors that will not fit in RAM once loaded (a --map-correct --folds
    run loads one set per fold), is a one-line error."""
    disk = n_todo * n_specs * (dim * 4 + 32)
    pending = min(PENDING_BYTES, n_todo * n_specs * dim * 4)
    where = Path(cache_dir).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    shape = f"{n_todo} texts x {n_specs} (pooling, layer) x {dim} x 4 B"
    if disk > free:
        raise ValueError(f"--cache-dir {cache_dir}: the vectors need {size(disk)} ({shape}) and "
                         f"the disk has {size(free)} free")
    loaded, ram = n_texts * dim * 4, runtime.host_available()
    if loaded > ram:
        raise MemoryError(f"the vectors of {n_texts} texts x {dim} need {size(loaded)} of RAM once "
                          f"loaded and this machine has {size(ram)} available; embed fewer texts "
                          f"(or --dim)")
    log(f"cache: {shape} = {size(disk)} on disk; memory while embedding about "
        f"{(model_bytes + pending) / runtime.GB:.1f} GB (the model and a batch, "
        f"{pending / runtime.GB:.2f} GB of vectors before each write); after it, "
        f"{n_texts * dim * 4 / runtime.GB:.2f} GB per (pooling, layer) loaded")


def size(n_bytes):
    """Bytes for a person: MB under a GB, GB above."""
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes < runtime.GB else f"{n_bytes / runtime.GB:.2f} GB"


def compute(embedder, texts, keys, caches, spec, run, rows_of, log):
    """Embed texts (this rank's share of them) in one pass for every cache's (pooling, layer),
    writing chunks as it goes. keys: their text keys; rows_of(texts) names the rows holding them.
    Returns measure_fidelity's figures on run.fidelity_texts of the vectors just computed, for
    int8 or int4 weights (else None)."""
    rank, world = torchrun.rank_and_world()
    dim = spec.dim or embedder.dim
    tokens = embedder.tokenize(texts, spec.instruction, spec.max_length, spec.eos)  # once, for all
    mine = range(len(texts))
    if world > 1:
        mine = torchrun.balance([len(t) for t in tokens], world)[rank]
    rows = torch.tensor([list(keys[j]) for j in mine], dtype=torch.uint8).reshape(-1, 32)
    writer = ChunkWriter(caches, rows, dim, run.chunk_size, run.chunk_seconds)
    sample = fidelity_sample(len(mine), run.fidelity_texts * (spec.weights != "none"))
    wanted, first, kept = set(sample), next(iter(caches)), {}  # of the first (pooling, layer)
    t0, done = time.time(), [0]  # done: counted here, as a disabled bar (--quiet) counts nothing
    with tqdm(total=len(mine), desc="embedding", unit="text", disable=not run.progress) as bar, \
            heartbeat("embedding", len(mine), lambda: done[0], bar.write if run.progress else log):
        with saved_on_error(writer, texts, mine, rows_of, len(caches) * dim):
            for batch, vectors in embedder.stream([tokens[j] for j in mine], list(caches), spec.dim,
                                                  True, run.batch_size, run.max_batch_tokens,
                                                  log=bar.write):
                writer.add(batch, vectors)
                kept.update({i: vectors[first][j] for j, i in enumerate(batch) if i in wanted})
                bar.update(len(batch))
                done[0] += len(batch)
    if world > 1:
        mine_tokens = sum(len(tokens[j]) for j in mine)
        every = torchrun.gather((rank, len(mine), mine_tokens, time.time() - t0), world)
        for r, n_texts, n_tokens, seconds in every:
            log(f"rank {r}: {n_texts} texts, {n_tokens} tokens, {seconds:.1f}s")
    if not sample:
        return None
    return measure_fidelity(embedder, [texts[mine[i]] for i in sample],
                            replace(spec, pooling=first[0], layer=first[1]), log,
                            torch.stack([kept[i] for i in sample]))


@contextlib.contextmanager
def heartbeat(what, total, done, log):
    """One line every HEARTBEAT_SECONDS (read now, not when the module was imported) while the block
    runs: what, done() of total texts, the minutes so far. From a thread, so that a first batch
    that compiles for minutes says so too, and under --quiet, where no bar is drawn."""
    every, stop, t0 = HEARTBEAT_SECONDS, threading.Event(), time.monotonic()

    def beat():
        while not stop.wait(every):
            log(f"{what}: {done()} of {total} texts after {(time.monotonic() - t0) / 60:.1f} min")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def saved_on_error(writer, texts, mine, rows_of, row_floats):
    """What was computed is written whatever ends the pass (Ctrl-C and SIGTERM too, where the disk
    has room); errors about a text name its rows, not its position in this rank's share."""
    try:
        yield
        writer.flush()
    except NonFiniteError as e:  # that batch is not cached
        writer.flush()
        rows = rows_of({texts[mine[i]] for i in e.indices})
        raise FloatingPointError(f"NaN or Inf in the vectors of rows {rows[:20]}"
                                 f"{' ...' if len(rows) > 20 else ''}; nothing of them was "
                                 f"cached") from None
    except TextTooLongError as e:
        writer.flush()
        raise MemoryError(f"row {rows_of({texts[mine[e.index]]})[0]}: its {e.tokens} tokens do not "
                          f"fit in GPU memory even alone; the {writer.saved} vectors computed so "
                          f"far are cached; lower --max-length") from None
    except DiskFullError as e:
        left = len(mine) - writer.saved
        need = left * (row_floats * 4 + 32) / 1e6
        raise DiskFullError(f"{e}. {writer.saved} of the {len(mine)} vectors to compute are "
                            f"cached; the other {left} need {need:.1f} MB more: free that much and "
                            f"run again to resume") from None
    finally:
        with contextlib.suppress(DiskFullError):
            writer.flush()


def compact(caches, dim, log):
    """Merge each cache's chunk files once there are many (Cache.compact); on a full disk, keep
    them."""
    for cache in caches:
        try:
            cache.compact(dim)
        except DiskFullError as e:  # the chunks are all there: merging them is only tidiness
            log(f"warning: {e}; the cache keeps its chunk files (merged by a later run)")


# -------------------------------------------------------------------- fidelity of quantized weights

def fidelity_sample(n_texts, n, seed=0):
    """The indices of the texts a run measures its quantized vectors on: a seeded sample."""
    return sorted(random.Random(seed).sample(range(n_texts), min(n, n_texts)))


def measure_sample(embedder, texts, n, spec, log):
    """measure_fidelity on a seeded sample of n texts, encoding them here (the LoRA paths, which
    cache no vectors); None for weights as shipped or n = 0."""
    if embedder.weight_format == "none" or not n:
        return None
    return measure_fidelity(embedder, [texts[i] for i in fidelity_sample(len(texts), n)], spec, log)


def measure_fidelity(embedder, texts, spec, log, vectors=None):
    """Per-text cosine between the quantized embedder's vectors of texts under spec (vectors, if
    the run has computed them already, else encoded here) and the weights as shipped
    (weights.reference_vectors), one line saying what it found, a warning below FIDELITY_WARN.
    Returns {"format", "texts", "min", "mean", "seconds"}."""
    t0 = time.time()
    if vectors is None:
        vectors = embedder.encode(texts, spec.instruction, max_length=spec.max_length, dim=spec.dim,
                                  pooling=spec.pooling, progress=False, layers=[spec.layer],
                                  append_eos=spec.eos)[spec.layer]
    reference = weights.reference_vectors(embedder, texts, spec.instruction, spec.max_length,
                                          spec.pooling, spec.layer, spec.dim, spec.eos)
    cos = (vectors * reference).sum(-1)
    found = {"format": embedder.weight_format, "texts": len(texts),
             "min": round(cos.min().item(), 5), "mean": round(cos.mean().item(), 5),
             "seconds": round(time.time() - t0, 1)}
    log(f"{found['format']} vs as shipped on {found['texts']} of these texts: cosine min "
        f"{found['min']:.4f}, mean {found['mean']:.4f} (reference read one layer at a time, "
        f"{found['seconds']:.0f} s)")
    if found["min"] < FIDELITY_WARN:
        wider = "int8" if found["format"] == "int4" else "none"
        log(f"warning: {found['format']} moves some vectors by more than cosine {FIDELITY_WARN}: "
            f"--quantize {wider} keeps them closer, if memory allows (--max-memory, a larger "
            f"machine)")
    return found


# ----------------------------------------------------------------------------- the files

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
    digests = [hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest() for t in texts]
    return torch.tensor([list(d) for d in digests], dtype=torch.uint8).reshape(len(texts), 32)


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
    """One spec's folder of chunk files. Each chunk records, in its safetensors metadata (not in
    the folder's name, so that the folders of before keep their names), the fingerprint of the code
    that computed it (fingerprint.code_fingerprint) and the content identity of the weights
    (fingerprint.model_identity): a chunk of other code or other weights is skipped, left on disk
    for the code that wrote it, and its texts computed afresh; a chunk written before these were
    recorded is used, and said (legacy)."""

    def __init__(self, cache_dir, spec, content):
        self.spec, self.content = spec, content
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        self.dir = Path(cache_dir) / digest[:20]
        self.code, self.functions = fingerprint.code_fingerprint()
        self.other_code = {}  # fingerprint -> {name: hash} of the chunks skipped
        self.other_weights = False  # chunks of this code skipped for other weights' content
        self.legacy = set()  # the chunk files read that record neither

    def files(self):
        """The chunk files, listed again until no new one appears: a chunk that another run merged
        away while we looked is skipped (read() returns None), and the merged file read instead."""
        for tmp in self.dir.glob(".chunk-*"):  # half-written by a run killed an hour ago or more
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
                meta = f.metadata() or {}
        except FileNotFoundError:
            return None
        except Exception:
            ok = False
        if not ok:
            self.corrupt(file)
            return None
        if "vector_code" not in meta:  # before fingerprints, or the hand-listed ones of before
            self.legacy.add(file)
        elif meta["vector_code"] != self.code:  # other code: not ours to use, nor to delete
            self.other_code[meta["vector_code"]] = json.loads(meta.get("vector_code_names", "{}"))
            return None
        elif meta.get("weights") != self.content:  # the same files, other bytes
            self.other_weights = True
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
            chunk = self.read(file, dim) or ()
            hits = {j: want.pop(k) for j, k in enumerate(chunk) if k in want}
            try:
                self.read_rows(file, hits, out)
            except FileNotFoundError:  # merged away by another run since read(): the merged file,
                want.update({chunk[j]: rows for j, rows in hits.items()})  # listed next, has them
        if want:
            raise FileNotFoundError(f"{self.dir}: {len(want)} vectors vanished from the cache "
                                    f"while reading (another run deleting its files?); run again")
        return out

    def read_rows(self, file, hits, out, rows_per_read=4096):
        """out[rows] = row j of the chunk's vectors, for each j: rows in hits, by runs of
        consecutive chunk rows, at most rows_per_read at a time (a merged file is never read whole
        at once)."""
        with safe_open(file, framework="pt") as f:
            vectors = f.get_slice("vectors")
            for a, b in runs(sorted(hits)):
                for start in range(a, b, rows_per_read):
                    block = vectors[start:min(b, start + rows_per_read)]
                    if not torch.isfinite(block).all():
                        self.corrupt(file, " (NaN or Inf)")
                        raise FloatingPointError(f"{file}: NaN or Inf in a cache chunk; deleted, "
                                                 f"run again to recompute its texts")
                    src = [j - start for j in range(start, start + len(block)) for _ in hits[j]]
                    dst = [i for j in range(start, start + len(block)) for i in hits[j]]
                    out[dst] = block[src]

    NOTES = ("fidelity", "code")  # what note() may add to spec.json beside the spec

    def info(self):
        """spec.json as written: the spec, and what was noted beside it (NOTES, not hashed). A key
        that is neither is refused, naming it: no version of this code wrote it."""
        try:
            found = json.loads((self.dir / "spec.json").read_text())
        except (OSError, ValueError):
            return dict(self.spec)
        unknown = sorted(found.keys() - self.spec.keys() - set(self.NOTES))
        if unknown:
            raise ValueError(f"{self.dir / 'spec.json'}: records {unknown}, which this version of "
                             f"the code does not know (a cache of newer code?)")
        return found

    def note(self, extra):
        """Add measured figures to spec.json, beside the spec (the hash is the spec's alone)."""
        if extra.keys() - set(self.NOTES):
            raise RuntimeError(f"Cache.note: {sorted(extra)} are not among Cache.NOTES")
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / "spec.json") as tmp:
            tmp.write_text(json.dumps({**self.info(), **extra, **self.spec}, indent=2))

    def save(self, keys, vectors):
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_file = self.dir / "spec.json"
        if not spec_file.exists():
            with atomic_path(spec_file) as tmp:
                tmp.write_text(json.dumps(self.spec, indent=2))
        # named by its texts, code and weights: the same texts by other code are another file
        name = hashlib.sha256(keys.numpy().tobytes() + self.code.encode()
                              + self.content.encode()).hexdigest()[:16]
        path = self.dir / f"chunk-{name}.safetensors"
        made_by = {"vector_code": self.code, "vector_code_names": json.dumps(self.functions),
                   "weights": self.content}
        with atomic_path(path) as tmp:
            save_file({"keys": keys.contiguous(), "vectors": vectors.contiguous()}, str(tmp),
                      made_by)
        known = self.info().get("code", {})
        if self.code not in known:  # readable beside the spec, not hashed
            self.note({"code": {**known, self.code: self.functions}})
        return path

    def compact(self, dim, max_files=None):
        """Merge the chunk files into one once there are more than max_files, so that many small
        (time-limited) chunks never slow a later load. Safe against a kill: the merged file is in
        place before any chunk is deleted, and duplicates are harmless. Safe against another run
        on the same cache: only files whose vectors are in the merged file are deleted.
        max_files None: COMPACT_AT, read at the call (a default bound when the module is imported
        would ignore a changed COMPACT_AT)."""
        max_files = COMPACT_AT if max_files is None else max_files
        files = list(self.files())
        if len(files) <= max_files:
            return
        keys, read = [], []
        for file in files:
            chunk = self.read(file, dim)
            if chunk is not None and file not in self.legacy:  # legacy chunks stay as they are
                keys += chunk
                read.append(file)
        if len(read) <= max_files:  # counted again: the chunks of other code are not merged
            return
        keys = list(dict.fromkeys(keys))  # each text once
        merged = self.load(keys, dim)
        rows = torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(len(keys), 32)
        path = self.save(rows, merged)
        for file in read:
            if file != path:
                file.unlink(missing_ok=True)


class Vectors:
    """One (pooling, layer)'s vectors of a run's texts, on disk until loaded; spec: the EmbedSpec
    that made them, as the run decided it."""

    def __init__(self, cache, keys, dim, spec, model_identity):
        self.cache, self.keys, self.dim, self.spec = cache, keys, dim, spec
        self.model_identity = model_identity  # the checkpoint's content, as fingerprinted

    def load(self, rows=None):
        """(len(rows), D) float32 for the given row indices (None: every text), read from disk."""
        keys = self.keys if rows is None else [self.keys[i] for i in rows]
        return self.cache.load(keys, self.dim)


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


# ----------------------------------------------------------------------------- vectors in a file

OURS = "qwen3-mlp"  # the embedder name this project writes in a vectors file


def made_by(spec, model_identity):
    """What shapes this project's vectors, as a vectors file records it: the decided spec and the
    content of the model."""
    return {"embedder": OURS, "settings": {**dataclasses.asdict(spec), "normalize": True,
                                           "model_identity": model_identity}}


def embedder_differences(a, b):
    """How two made_by records differ, as "name: a's value vs b's value" ([] when they name the
    same vectors: the same embedder and settings; the model's name may differ where both record
    the same content, a moved or copied model)."""
    def flat(record):
        settings = dict(record["settings"])
        if settings.get("model_identity"):
            settings.pop("model", None)
        return {"embedder": record["embedder"], **settings}
    a, b = flat(a), flat(b)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def ours_file(path):
    """Whether a file is a vectors file (so that --save-vectors may replace it)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {"ids", "embedder", "settings"} <= (f.metadata() or {}).keys()
    except Exception:
        return False


def write_vectors(path, ids, vectors, record):
    """A vectors file: a safetensors file holding "vectors", (rows, dim) float32, with the row ids
    (safetensors holds no strings: a JSON list in its metadata) and what made them (record:
    {"embedder": a name, "settings": what shapes a vector, e.g. model, model_identity, pooling,
    normalize, instruction}), so that a head trained on them can be checked against them later."""
    meta = {"ids": json.dumps([str(i) for i in ids]), "embedder": record["embedder"],
            "settings": json.dumps(record["settings"], sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({"vectors": vectors.float().contiguous()}, str(tmp), meta)


def read_vectors(path, ids):
    """(len(ids), dim) float32 whose row i is the vector of id ids[i], and the file's made_by
    record. Extra ids in the file are fine; a file that is not a vectors file, an id it lacks, a
    repeated id, NaN or Inf are one line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())
            vectors = f.get_tensor("vectors") if "vectors" in names else None
    except FileNotFoundError:
        raise FileNotFoundError(f"--vectors {path}: no such file") from None
    except Exception as e:
        raise ValueError(f"--vectors {path}: not a safetensors file ({str(e).splitlines()[0]})") \
            from None
    if vectors is None or vectors.ndim != 2 or not vectors.is_floating_point() or \
            not {"ids", "embedder", "settings"} <= meta.keys():
        raise ValueError(f"--vectors {path}: not a vectors file (a (rows, dim) float tensor "
                         f"'vectors' with 'ids', 'embedder' and 'settings' metadata; "
                         f"tools/st_vectors.py writes one)")
    file_ids = json.loads(meta["ids"])
    if len(file_ids) != len(vectors) or len(set(file_ids)) != len(file_ids):
        raise ValueError(f"--vectors {path}: {len(file_ids)} ids for {len(vectors)} rows, or an id "
                         f"repeated")
    row = {i: r for r, i in enumerate(file_ids)}
    lacking = [i for i in ids if str(i) not in row]
    if lacking:
        raise ValueError(f"--vectors {path}: lacks {len(lacking)} of the {len(ids)} ids, e.g. "
                         f"{lacking[:5]}")
    x = vectors[[row[str(i)] for i in ids]].float()
    bad = [ids[r] for r in (~torch.isfinite(x).all(1)).nonzero().flatten().tolist()]
    if bad:
        raise FloatingPointError(f"--vectors {path}: NaN or Inf in the vectors of ids {bad[:10]}")
    return x, {"embedder": meta["embedder"], "settings": json.loads(meta["settings"])}

