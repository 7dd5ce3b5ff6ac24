"""Where the model runs: the checkpoint folder, the device, the compute dtype, the memory there is,
and the speed-only paths (FlashAttention on packed tokens, torch.compile). None of this changes a
vector beyond rounding; qwen_embed.py reads as the plain forward pass because it lives here.

    folder = resolve_model_dir("Qwen/Qwen3-8B")        # a local folder, or fetched from the Hub
    device, dtype = pick_device_dtype()                # cuda + bf16 on Ampere+, fp32 on a T4, ...
    free = memory_budget(device)                       # bytes this process may fill there
"""

import ctypes
import inspect
import os
import warnings
from contextlib import contextmanager

import torch


GB = 1e9  # memory is reported in decimal GB, as the Hub and GPU spec sheets do


# ----------------------------------------------------------------------------- device and dtype

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}


def cpu_has_native_bf16():
    """AVX-512 BF16 or AMX: bf16 matmuls run about 2x fp32's FLOP rate (and halve the memory).
    Without them bf16 is emulated, several times slower than fp32 (5.5x measured on an AVX2 CPU)."""
    return any(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)()
               for name in ("avx512_bf16", "amx_tile"))


FLOAT16_LINE = ("float16, guarded: every matmul in float16 on inputs scaled per row by a power of "
                "two, everything between matmuls in float32 (plain float16 overflows on Qwen3)")


def default_dtype(device):
    """bf16 where the hardware computes it natively: CUDA from compute capability 8.0 (Ampere) and
    CPUs with AVX-512 BF16 or AMX. CUDA 7.0 to 7.5 (V100, T4: float16 tensor cores, no bf16):
    guarded float16 (weights.guard_float16; plain float16 overflows on Qwen3's activations). Older
    GPUs (P100, P4, P40: float16 at a fraction of their float32 rate), MPS and other CPUs:
    float32."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16
        return torch.float16 if major == 7 else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def pick_device(device=None):
    """torch.device: as given, else CUDA when a GPU is present, else MPS (Apple Silicon), else the
    CPU."""
    if device is None:
        device = ("cuda" if torch.cuda.is_available() else
                  "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r} (try 'cpu', 'cuda', 'cuda:1' or "
                         f"'mps')") from None
    backend = getattr(torch, device.type, None)
    usable = backend and hasattr(backend, "is_available") and backend.is_available()
    if device.type != "cpu" and not usable:
        raise ValueError(f"device {device} asked for, but this machine or torch build has none")
    return device


def pick_device_dtype(device=None, dtype=None):
    """(torch.device, torch.dtype): pick_device(device), and dtype as given or
    default_dtype(device)."""
    device = pick_device(device)
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    dtype = default_dtype(device) if dtype is None else dtype
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):  # float16: always guarded
        raise ValueError(f"unknown dtype {dtype!r} (use 'bfloat16', 'float32' or 'float16')")
    return device, dtype


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- memory

def host_available():
    """Bytes of RAM a new allocation can take without swapping: MemAvailable on Linux."""
    try:
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
            return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device, max_memory_gb=None):
    """(bytes, how it was found) this process may fill on device: --max-memory if given; else free
    GPU memory on CUDA, the recommended working set on MPS, available RAM on the host. Under
    torchrun the ranks of a node share the host's RAM or the Mac's memory (each holds its own copy
    of the model); on CUDA each rank has its own GPU."""
    if max_memory_gb is not None:
        if max_memory_gb <= 0:
            raise ValueError(f"--max-memory must be positive, got {max_memory_gb}")
        return int(max_memory_gb * GB), f"--max-memory {max_memory_gb:g}"
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        where = "mps has {} of its recommended working set free"
    elif hasattr(backend, "mem_get_info"):  # CUDA, and the other accelerators that say (xpu, ...)
        free, where = backend.mem_get_info(device)[0], f"{device} has {{}} free"
    else:
        free, where = host_available(), "this machine has {} of RAM available"
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if ranks > 1 and device.type in ("cpu", "mps"):  # on an accelerator each rank has its own
        free, where = free // ranks, where + f", shared by {ranks} processes"
    return free, where.format(f"{free / GB:.1f} GB")


@contextmanager
def compact_heap():
    """While loading weights: keep every allocation of 1 MiB or more in its own mapping (glibc
    only). glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB);
    then blocks of a few MiB come from the heap, where the long-lived weights interleave with the
    loader's temporaries, and the gaps these leave can never go back to the OS. Measured loading the
    8B shape in int8: 11.1 GB resident for 7.6 GB of weights with the default, 7.8 GB with this.
    After loading, 32 MiB: the ceiling the default reaches anyway, so the forward pass runs as it
    always did."""
    try:
        mallopt = ctypes.CDLL(None).mallopt if os.confstr("CS_GNU_LIBC_VERSION") else None
    except (AttributeError, OSError, ValueError):
        mallopt = None
    if mallopt:
        mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    try:
        yield
    finally:
        if mallopt:
            mallopt(-3, 32 << 20)


def trim_heap():
    """Give the free pages inside glibc's heap back to the OS (malloc_trim; glibc only). After
    loading, blocks under 32 MiB come from the heap (compact_heap), where long-lived small ones
    (vectors waiting to be written) pin the pages around the freed ones, and the heap only grows.
    Called after each batch that kept every layer's states: a --layer-sweep --compare-pooling at
    the 8B's width and depth peaked at 2.31 GB with compiled blocks, 1.39 GB with this (1,000
    texts; 1.45 GB eager without it)."""
    try:
        if os.confstr("CS_GNU_LIBC_VERSION"):
            ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, ValueError):
        pass


def empty_cache(device):
    """Give cached blocks back after an out-of-memory error, where the backend has such a cache."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "empty_cache"):
        backend.empty_cache()


def is_out_of_memory(error):
    """CUDA raises torch.OutOfMemoryError; MPS (and other backends) a RuntimeError saying so."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def plan_batches(lengths, max_tokens, max_texts=None, ordered=False):
    """Cut texts into batches, shortest first: lists of indices into lengths, each batch at most
    max_texts texts and max_tokens tokens (a text longer than max_tokens gets a batch of its own).
    Sorting keeps padding in attention small; packing removes it from everything else.
    ordered: in the texts' order instead, consecutive texts per batch."""
    order = sorted(range(len(lengths)), key=lambda i: 0 if ordered else lengths[i])
    batches, tokens = [], 0
    for i in order:
        if not batches or tokens + lengths[i] > max_tokens or \
                len(batches[-1]) == (max_texts or len(order) + 1):
            batches.append([])
            tokens = 0
        batches[-1].append(i)
        tokens += lengths[i]
    return batches


def default_batch_tokens(config, device, dtype, keep_layers=False):
    """Tokens per forward pass when the caller does not say.

    Not CUDA: 2048, the fastest measured on a 2-core CPU (larger batches fall out of cache: 16384
    was 25-35% slower); with keep_layers (every layer's state kept until pooling) fewer, so that the
    kept states stay under 256 MiB. CUDA: as many as fit in a third of the free GPU memory
    (torch.cuda.mem_get_info), counting one layer's live activations per token (activation_bytes;
    with keep_layers, every layer's output too), between 1024 and 65536: a GPU
    needs tens of thousands of tokens per matmul to be busy, and texts are sorted by length, so a
    big batch costs no extra padding."""
    itemsize = 4 if dtype == torch.float16 else dtype.itemsize  # guarded float16 keeps float32
    kept = keep_layers * (config.num_hidden_layers + 1) * config.hidden_size * itemsize
    if device.type != "cuda":
        return 2048 if not kept else int(max(64, min(2048, (256 << 20) // kept)))
    free = torch.cuda.mem_get_info(device)[0]
    return int(max(1024, min(65536, free // 3 // (kept + activation_bytes(config, dtype)))))


def room_batch_tokens(config, device, dtype, keep_layers=False):
    """The batch that the weight-format check (weights.choose_format) keeps room for: the default
    off CUDA; on CUDA the smallest default (1024 tokens), as the default there grows into whatever
    memory the weights leave."""
    if device.type == "cuda":
        return 1024
    return default_batch_tokens(config, device, dtype, keep_layers)


def activation_bytes(c, dtype):
    """Bytes of one layer's live activations per token: q, k, v, the attention output and the padded
    grid, the MLP's three intermediate-wide tensors and a few residual-wide ones. Guarded float16
    keeps them in float32 between the matmuls: 4 bytes each (the float16 copies of a matmul's input
    live only during that matmul)."""
    itemsize = 4 if dtype == torch.float16 else dtype.itemsize
    return itemsize * (8 * c.hidden_size + 3 * c.intermediate_size
                       + 4 * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim)


# ----------------------------------------------------------------------------- speed only

try:  # attention straight on packed tokens (FlashAttention; CUDA, bf16), torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
    VARLEN_ARGS = set(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn, VARLEN_ARGS = None, set()


def varlen_usable(device, dtype):
    return varlen_attn is not None and device.type == "cuda" and dtype == torch.bfloat16


def varlen_attention(q, k, v, pack):
    """The model's attention function (qwen_embed.sdpa_attention) on the packed tokens themselves,
    by FlashAttention: no grid, no padding (CUDA, bf16; speed only)."""
    return causal_varlen_attn(q, k, v, pack.cu, pack.max_len)


def causal_varlen_attn(q, k, v, cu, max_len):
    """Causal attention within each text of a packed batch; cu: (B+1,) int32 start offsets.
    The API changed across torch releases: 2.10 takes is_causal, later ones a window, (-1, 0) =
    everything before and nothing after; enable_gqa came later still, so before it k and v are
    repeated for each query head of their group. The default scale is ours, head_dim ** -0.5."""
    kw = {"window_size": (-1, 0)} if "window_size" in VARLEN_ARGS else {"is_causal": True}
    if "enable_gqa" in VARLEN_ARGS:
        kw["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


COMPILE_MIN_TOKENS = 100_000  # compile=None compiles CUDA jobs this large (FastPaths.maybe_compile)


def compile_blocks(model):
    """torch.compile each block, nothing else: it fuses RMSNorm, RoPE, SwiGLU and the residual adds
    into a few kernels (run eagerly on a GPU, these passes over memory take longer than the 0.6B's
    matmuls). The code compiled is qwen_embed's; compile=False runs it eagerly, as the reference.
    All blocks share one graph and the token count is a dynamic size, so it compiles once per run,
    not once per layer or per batch shape, and inductor caches the result on disk for later runs."""
    for block in model.layers:
        block.forward = torch.compile(block.forward, dynamic=True)


def uncompile_blocks(model):
    for block in model.layers:
        block.__dict__.pop("forward", None)  # the class's eager forward again


class FastPaths:
    """An embedder's speed-only paths, decided once: FlashAttention on packed tokens where
    varlen_usable, and torch.compile. compile=None decides by what was measured: on the CPU,
    never (end to end on 2,272 MAP rows it cost up to 2.8x at a tiny width and gained nothing
    measurable at the 0.6B's and the 8B's widths, its compile time counted: docs/measurements.md);
    on CUDA, for jobs of COMPILE_MIN_TOKENS tokens or more (not yet measured on a GPU). If a fast
    path fails, one warning says so and the eager, padded reference path runs from then on:
    slower, never wrong."""

    def __init__(self, device, dtype, compile=None):
        self.varlen, self.compile, self.compiled = varlen_usable(device, dtype), compile, False
        self.device_type = device.type

    def maybe_compile(self, model, n_tokens, log):
        small = n_tokens < COMPILE_MIN_TOKENS or self.device_type != "cuda"
        if self.compiled or self.compile is False or (self.compile is None and small):
            return
        log("compiling the model's blocks with torch.compile: once per run, longer the first time, "
            "cached on disk after (compile=False or --no-compile runs eagerly)")
        compile_blocks(model)
        self.compiled = True

    def release(self, model):
        """Once a run is done with the model: the compiled blocks and torch.compile's caches (its
        graphs, kernels and traced tensors) are dropped, so that they hold no memory beside the
        vectors and the heads that follow (measured after a --layer-sweep's embedding at the 8B's
        width: 1.91 GB resident without this, 1.57 GB with it); a later compile in this process is
        served by inductor's disk cache."""
        if self.compiled:
            uncompile_blocks(model)
            torch._dynamo.reset()
            self.compiled = False

    def fall_back(self, model, error):
        """After a forward pass failed with error: True if a fast path was on (now off, said once),
        False if the eager path itself failed (the caller raises)."""
        on = [name for name, used in (("torch.compile", self.compiled),
                                      ("varlen attention", self.varlen)) if used]
        if not on:
            return False
        why = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
        warnings.warn(f"{' and '.join(on)} failed ({why}); running the eager reference path "
                      f"instead")
        uncompile_blocks(model)
        self.compile, self.compiled, self.varlen = False, False, False
        return True


class TextTooLongError(MemoryError):
    """One text that does not fit in device memory even alone; .index and .tokens say which."""

    def __init__(self, index, tokens):
        super().__init__(f"text {index} ({tokens} tokens) does not fit in device memory even "
                         f"alone; lower max_length")
        self.index, self.tokens = index, tokens


def run_batches(model, ids, max_tokens, max_texts, need_layers, device, fast, log):
    """The model over tokenized texts, batch by batch as plan_batches cuts them: yields (indices
    into ids, (final states, layer states or None)). A batch that runs out of device memory is cut
    again, with every batch after it, at half its tokens; the smaller budget holds for the rest of
    this call, and is said once when a batch fits. A fast path that fails is dropped
    (FastPaths.fall_back) and the batch run again on the eager path."""
    lengths = [len(i) for i in ids]
    pending, failed_at = plan_batches(lengths, max_tokens, max_texts)[::-1], None
    while pending:
        batch = pending.pop()
        flat = torch.tensor([t for i in batch for t in ids[i]]).to(device)
        try:
            out = model(flat, torch.tensor([lengths[i] for i in batch]), return_layers=need_layers,
                        attend=varlen_attention if fast.varlen else None)
        except Exception as e:  # out of memory, or a fast path that does not work here
            out_of_memory = is_out_of_memory(e)
            if not out_of_memory and not fast.fall_back(model, e):
                raise
        else:
            if failed_at:
                log(f"out of GPU memory with {failed_at} tokens in a batch: carrying on with at "
                    f"most {max_tokens}")
                failed_at = None
            yield batch, (out if need_layers else (out, None))
            if need_layers:  # every layer's states were held: give their pages back (trim_heap)
                del out
                trim_heap()
            continue
        # Out of the except clause, the failed batch's tensors (held by the traceback) are freed.
        del flat
        if not out_of_memory:
            pending.append(batch)  # again, on the eager path
            continue
        empty_cache(device)
        if len(batch) == 1:
            raise TextTooLongError(batch[0], lengths[batch[0]])
        tokens = sum(lengths[i] for i in batch)
        failed_at, max_tokens = failed_at or tokens, tokens // 2
        rest = batch + [i for b in pending for i in b]
        plan = plan_batches([lengths[i] for i in rest], max_tokens, max_texts)
        pending = [[rest[j] for j in b] for b in plan][::-1]
