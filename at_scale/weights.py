"""Weight formats: how the linear layers and the embedding table keep their weights, apart from
the dtype the model computes in. Applied at one call site (qwen_embed.load_weights); the forward
pass reads the same with or without them.

    as shipped  the checkpoint's dtype (bfloat16 for every Qwen3 release), or the compute dtype if
                that is narrower. Where compute is wider (float32 on a CPU without native bf16),
                each layer converts its weight inside the forward, one layer at a time: bf16 ->
                fp32 is exact, so the vectors equal a float32 copy's, at half its memory.
    int8        symmetric, a float16 scale per group of GROUP = 32 consecutive weights of a row
                (llama.cpp's Q8_0): w ~ q * scale, q in -127..127. 8.5 bits per weight.
    int4        asymmetric, per group of 32: w ~ q * scale - offset, q in 0..15 (all 16 levels,
                two per byte). scale and offset are themselves stored as 8-bit codes of a float32
                step per row (as llama.cpp's K-quants keep 6-bit codes per block): 4.5 bits per
                weight. The embedding table and every v_proj stay in int8 (MIXED_8BIT): measured
                the most sensitive (README, "Quantized weights"); 4.9 bits per weight for the 8B.

Both are quantized while loading, a block of rows at a time from the safetensors file (never a
full-precision copy), and dequantized right before each matmul, in the compute dtype: a large
batch is fastest as dequantize-then-matmul. Round to nearest: every weight is within half a step
of its group's grid (tests/test_weights.py). choose_format() decides the format once per run,
before any weight is read, from the safetensors headers and the memory budget.
"""

import json
import math
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from at_scale.runtime import GB, activation_bytes, default_batch_tokens, dtype_name, plan_batches
from qwen_embed import Block, Packing, RMSNorm, our_key, pool, read_checkpoint, rope, weight_files

GROUP = 32  # weights per scale: llama.cpp's block size; 128 and 64 measured worse (README)
FORMATS = ("none", "int8", "int4")
MIXED_8BIT = ("embed_tokens.weight", "v_proj.weight")  # int4's exceptions, kept in int8
ROWS_PER_READ = 4096  # rows read, converted and quantized at once (the 8B's table: 16 MiB of bf16)
RUNTIME_BYTES = int(0.5 * GB)  # torch, the tokenizer and Python itself: about 0.4 GB RSS measured
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                      "F16": torch.float16, "I64": torch.int64, "I32": torch.int32,
                      "I8": torch.int8, "U8": torch.uint8}


# ---------------------------------------------------------------------------------- the quantizer

def groups(w):  # (out, in) -> (out, in / GROUP, GROUP) float32
    if w.shape[-1] % GROUP:
        raise ValueError(f"int8/int4 need input sizes divisible by {GROUP}, got a weight of shape "
                         f"{tuple(w.shape)}")
    return w.float().view(w.shape[0], -1, GROUP)


def quantize_int8(w):
    """(out, in) -> q int8 (out, in), scale float16 (out, in / GROUP): each group's largest |w| is
    127."""
    g = groups(w)
    scale = (g.abs().amax(-1) / 127).half()
    q = torch.round(g / scale.float().clamp_min(1e-30)[..., None]).clamp_(-127, 127)
    return {"weight": q.to(torch.int8).view(w.shape), "scale": scale}


def quantize_int4(w):
    """(out, in) -> weight uint8 (out, in / 2): two 4-bit q per byte, the even column in the low
    nibble; codes uint8 (out, in / GROUP, 2) and steps float32 (out, 2): each group's scale and
    offset are codes * steps. A group's grid, -offset + scale * (0..15), covers [lo, hi] (0
    included, so a zero stays zero): the codes are rounded up, never inward, so every weight is
    within half a step of the grid."""
    g = groups(w)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)      # (out, in / GROUP)
    steps = torch.empty(w.shape[0], 2, device=w.device)
    steps[:, 1] = (-lo).amax(1) / 255                               # 8-bit codes cover the row
    offset_code = torch.ceil(-lo / steps[:, 1:].clamp_min(1e-30)).clamp_(max=255)  # 255.00001: 255
    offset = offset_code * steps[:, 1:]                             # >= -lo
    wanted = (hi + offset) / 15                                     # 15 steps from -offset reach hi
    steps[:, 0] = wanted.amax(1) / 255
    scale_code = torch.ceil(wanted / steps[:, :1].clamp_min(1e-30)).clamp_(1, 255)
    scale = scale_code * steps[:, :1]
    q = torch.round((g + offset[..., None]) / scale[..., None]).clamp_(0, 15)  # like g
    q = q.to(torch.uint8).view(w.shape[0], -1)                      # (out, in)
    codes = torch.stack((scale_code, offset_code), -1).to(torch.uint8)
    return {"weight": q[:, 0::2] | (q[:, 1::2] << 4), "codes": codes, "steps": steps}


def dequantize(t, dtype):
    """The stored tensors of one weight (or of some of its rows) -> (rows, in) in dtype."""
    q = t["weight"]
    if "scale" in t:  # int8
        g = q.view(q.shape[0], -1, GROUP).to(dtype)                # (out, in / GROUP, GROUP)
        return (g * t["scale"].to(dtype)[..., None]).view(q.shape)
    if "codes" in t:  # int4: unpack the nibbles, then q * scale - offset, in place
        q = torch.stack((q & 15, q >> 4), -1).view(q.shape[0], -1, GROUP)
        scale, offset = (t["codes"].to(dtype) * t["steps"].to(dtype)[:, None]).unbind(-1)
        return q.to(dtype).mul_(scale[..., None]).sub_(offset[..., None]).view(q.shape[0], -1)
    return q.to(dtype)  # as shipped


def bits_of(key, fmt):
    """8, 4, or None (as shipped) for a 2-D weight of our key under a format."""
    if fmt == "none":
        return None
    return 8 if fmt == "int8" or key.endswith(MIXED_8BIT) else 4


# ---------------------------------------------------------------------------------- stored layers

class Dequantize(torch.autograd.Function):
    """x @ W.T for a frozen stored weight that keeps nothing for the backward pass: the gradient
    of the input, grad @ W, converts W again there. Plain F.linear would save its converted copy
    of W (a full-precision weight per layer, alive until backward), which is what LoRA on a
    quantized base (QLoRA) is meant to avoid."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.full_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.full_weight(grad.dtype), None


class StoredLinear(nn.Module):
    """A frozen nn.Linear (no bias) whose weight is stored in int8, int4 or as shipped, and
    converted to the input's dtype right before the matmul."""

    def __init__(self, stored, in_features):  # stored: {"weight": ..., and the format's scales}
        super().__init__()
        self.out_features, self.in_features = stored["weight"].shape[0], in_features
        for name, t in stored.items():
            self.register_buffer(name, t)

    def stored(self):
        return dict(self.named_buffers())

    def full_weight(self, dtype):
        return dequantize(self.stored(), dtype)

    def forward(self, x):  # (N, in) -> (N, out)
        if torch.is_grad_enabled() and x.requires_grad:
            return Dequantize.apply(x, self)
        return F.linear(x, self.full_weight(x.dtype))


class StoredEmbedding(nn.Module):
    """nn.Embedding with a stored table: only the rows looked up are converted to dtype."""

    def __init__(self, stored, dtype):
        super().__init__()
        for name, t in stored.items():
            self.register_buffer(name, t)
        self.dtype = dtype  # the compute dtype: ids carry none

    def forward(self, ids):  # (N,) -> (N, hidden)
        rows = {name: t[ids] for name, t in self.named_buffers()}  # every buffer is per row
        return dequantize(rows, self.dtype)


def stored_dtype(source, dtype):
    """As shipped: the checkpoint's dtype, or the compute dtype where that is narrower (fp32 ->
    bf16)."""
    return dtype if dtype.itemsize <= source.itemsize else source


def read_stored(f, key, fmt, dtype, device, file, offset):
    """One tensor of an open safetensors file, in its stored form: {"weight": tensor, and for int8
    or int4 its scales}. Vectors (the norms' weights) are always in the compute dtype: they are
    tiny. key: ours; file, offset: where the tensor's bytes start, for quantizing, which reads a
    block of rows at a time."""
    sliced = f.get_slice(key)
    shape = sliced.get_shape()
    bits = bits_of(key, fmt) if len(shape) == 2 else None
    if bits is None:
        t = f.get_tensor(key)  # memory-mapped: the same dtype on the CPU stays a view of the file
        kept = dtype if len(shape) != 2 else stored_dtype(t.dtype, dtype)
        return {"weight": t.to(device=device, dtype=kept)}
    source = SAFETENSORS_DTYPES[sliced.get_dtype()]
    quantize = quantize_int8 if bits == 8 else quantize_int4
    stored = {}
    for start in range(0, shape[0], ROWS_PER_READ):  # a block of rows at a time: no full copy
        stop = min(shape[0], start + ROWS_PER_READ)
        block = quantize(read_rows(file, offset, shape, source, start, stop))
        for name, t in block.items():  # filled in place: never the quantized tensor twice either
            if name not in stored:
                stored[name] = torch.empty((shape[0], *t.shape[1:]), dtype=t.dtype, device=device)
            stored[name][start:stop] = t.to(device)
    return stored


def read_rows(file, offset, shape, dtype, start, stop):
    """Rows start:stop of a 2-D tensor whose bytes start at offset in file, read with plain file
    I/O: through the OS's cache, not mapped into this process (a memory-mapped read keeps every page
    of a 4 GB shard resident here until the file is closed: 4 GB more peak RSS for nothing)."""
    row = shape[1] * dtype.itemsize
    buffer = bytearray((stop - start) * row)
    with open(file, "rb") as fh:
        fh.seek(offset + start * row)
        fh.readinto(buffer)
    return torch.frombuffer(buffer, dtype=dtype).view(stop - start, shape[1])


def read_lookup(file, offset, shape, dtype, ids):
    """Rows ids (a list, any order, repeats allowed) of a 2-D tensor in file: only those rows are
    read, as read_rows does, each distinct row once."""
    row, unique = shape[1] * dtype.itemsize, sorted(set(ids))
    buffer = bytearray(len(unique) * row)
    with open(file, "rb") as fh:
        for j, i in enumerate(unique):
            fh.seek(offset + i * row)
            fh.readinto(memoryview(buffer)[j * row:(j + 1) * row])
    where = {i: j for j, i in enumerate(unique)}
    rows = torch.frombuffer(buffer, dtype=dtype).view(len(unique), shape[1])
    return rows[torch.tensor([where[i] for i in ids])]


def apply_format(model, stored, dtype):
    """Swap StoredLinear / StoredEmbedding in for every nn.Linear / nn.Embedding whose weight in
    stored form is not a plain dtype tensor (the call site: before load_state_dict(assign=True)).
    stored: {tensor key: read_stored's dict}."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        tensors = stored[f"{name}.weight"]
        if len(tensors) == 1 and tensors["weight"].dtype == dtype:
            continue  # already what the forward computes in: the plain module, no conversion
        new = (StoredLinear(tensors, module.in_features) if isinstance(module, nn.Linear)
               else StoredEmbedding(tensors, dtype))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


# ---------------------------------------------------------------------------------------- loading

def checkpoint_tensors(folder):
    """{our key: (shape, dtype on disk)} from the safetensors headers: what choose_format weighs."""
    out = {}
    for file in weight_files(folder):
        try:
            header = read_header(file)
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        out.update({our_key(k): v for k, v in header.items() if our_key(k)})
    return out


def load_stored(model, folder, device, dtype, fmt="none", prefix=""):
    """qwen_embed.load_weights, each tensor read straight into its stored form (as shipped, int8 or
    int4: read_stored) on device, then StoredLinear / StoredEmbedding swapped in where that form
    is not the compute dtype (apply_format) before the model is filled: never a second copy of the
    model. prefix: load only the tensors under it (e.g. "layers.3." into one Block)."""
    offsets = {}  # per file: where each tensor's bytes start (quantizing reads a block of rows)

    def read(f, key, file):
        if file not in offsets:
            offsets[file] = read_header(file, offsets=True)
        return read_stored(f, key, fmt, dtype, device, file, offsets[file][key])

    stored = read_checkpoint(model, folder, read, prefix)
    apply_format(model, stored, dtype)
    state = {key.removesuffix("weight") + name: t
             for key, tensors in stored.items() for name, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)


# ---------------------------------------------------- the weights as shipped, one block at a time

@torch.inference_mode()
def streamed_states(folder, config, ids, device, dtype, layer=None, max_tokens=2048):
    """The hidden states of tokenized texts with the weights as shipped, read from the checkpoint
    one block at a time (a block in memory, then dropped): the reference a quantized model is
    measured against, wherever the quantized model itself fits. ids: token ids per text; layer: as
    in Qwen3Model (None: the final normed output, else the residual stream after that many
    blocks). Returns (N, hidden), the texts' tokens concatenated. Every text passes a block before
    the next block is read, in runs of consecutive texts of at most max_tokens tokens."""
    embed = next(((file, key) for file in weight_files(Path(folder)) for key in
                  read_header(file) if our_key(key) == "embed_tokens.weight"), None)
    if embed is None:
        raise ValueError(f"{folder}: no embed_tokens.weight in the checkpoint")
    file, key = embed
    shape, source = read_header(file)[key]
    offset = read_header(file, offsets=True)[key]
    runs, states = [], []  # (pack, cos, sin) of each run of texts; its hidden states (n, hidden)
    for chunk in plan_batches([len(i) for i in ids], max_tokens, ordered=True):
        flat = [t for i in chunk for t in ids[i]]
        states.append(read_lookup(file, offset, shape, source, flat).to(device, dtype))
        pack = Packing([len(ids[i]) for i in chunk], device)
        runs.append((pack, *rope(pack.positions, config.head_dim, config.rope_theta, dtype)))
    for i in range(config.num_hidden_layers if layer is None else layer):
        with torch.device("meta"):
            block = Block(config)
        load_stored(block, folder, device, dtype, "none", prefix=f"layers.{i}.")
        states = [block(x, cos, sin, pack) for x, (pack, cos, sin) in zip(states, runs)]
        del block
    x = torch.cat(states)
    if layer is not None:
        return x
    with torch.device("meta"):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    load_stored(norm, folder, device, dtype, "none", prefix="norm.")
    return norm(x)


def reference_vectors(embedder, texts, instruction=None, max_length=8192, pooling="last",
                      layer=None, dim=None, append_eos=True):
    """What embedder.encode would return with the weights as shipped (L2-normed), computed with them
    streamed from the checkpoint one block at a time (streamed_states), in the embedder's compute
    dtype: the yardstick of a quantized model, at the memory of one block more."""
    ids = embedder.tokenize(texts, instruction, max_length, append_eos)
    config = embedder.model.config
    key = None if layer is None else layer % (config.num_hidden_layers + 1)  # as stored
    dtype = torch.float32 if embedder.dtype == torch.float16 else embedder.dtype  # never plain fp16
    h = streamed_states(embedder.folder, config, ids, embedder.device, dtype, key,
                        default_batch_tokens(config, embedder.device, dtype))
    return pool(h, torch.tensor([len(i) for i in ids]), pooling, dim, True).cpu()


# -------------------------------------------------------------------------------- guarded float16

# GPUs without bf16 (T4, V100: compute capability 7.x) have float16 tensor cores, 8x their float32
# rate on a T4. Plain float16 overflows on Qwen3 (NaN vectors, QwenLM/Qwen3-Embedding#164): not in
# the matmuls, which accumulate in float32, but in the values between them. Trained LLMs grow a few
# residual-stream channels past 65,504 on a few tokens, and silu(gate) * up past it for the same
# tokens. So here only the matmuls see float16, on inputs scaled into range: the residual stream,
# the norms, silu(gate) * up, RoPE and the pooled vectors stay float32 (the model runs in float32,
# guard_float16 swaps its linear layers and wraps its attention: its forward is unchanged).

def power_of_two_at_least(t):
    """2 ** ceil(log2(t)) elementwise (1 where t is 0): dividing by a power of two is exact, so the
    scaling adds no rounding of its own. t = m * 2 ** e with m in [0.5, 1): 2 ** e >= t."""
    _, exponent = torch.frexp(t)
    return torch.ldexp(torch.ones_like(t), exponent)


class Float16Linear(nn.Module):
    """x @ W.T on float16 tensor cores for a float32 x: each row of x divided by a power of two at
    least its largest |value|, each row of W by one at least its L2 norm, so |x16| <= 1, ||w16|| <=
    1 and every output |y16| <= sqrt(in_features) (111 for the 8B's widest layer): far inside
    float16's 65,504 whatever the activations. The product is scaled back in float32. base: an
    nn.Linear, or a StoredLinear (int8, int4 or as shipped), dequantized here at each call."""

    def __init__(self, base):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        quantized = isinstance(base, StoredLinear) and base.weight.dtype in (torch.int8,
                                                                             torch.uint8)
        w = (base.full_weight(torch.float32) if isinstance(base, StoredLinear)
             else base.weight.float())
        row_scale = power_of_two_at_least(w.norm(dim=1))  # (out,)
        self.register_buffer("row_scale", row_scale)
        if quantized:  # kept in its stored form, as small as it was: dequantized at each call
            self.base = base
        else:  # as shipped: converted once, float16 in place of bf16 (the same memory)
            self.register_buffer("weight", (w / row_scale[:, None]).half())
            self.base = None

    def weight16(self):  # (out, in) float16, rows of L2 norm <= 1
        if self.base is None:
            return self.weight
        return (self.base.full_weight(torch.float32) / self.row_scale[:, None]).half()

    def forward(self, x):  # (N, in) float32 -> (N, out) float32
        x_scale = power_of_two_at_least(x.abs().amax(-1, keepdim=True))  # (N, 1)
        y = F.linear((x / x_scale).half(), self.weight16())  # float32 accumulation inside
        return y.float() * (x_scale * self.row_scale)


def float16_attention(attend):
    """The model's attention function in float16: q and k as they are (RMSNorm'd per head, so
    bounded by sqrt(head_dim) times the norm's weight), v divided by a power of two at least its
    largest |value| (the output is a weighted mean of v's rows, so it scales back exactly). SDPA
    accumulates the scores and the softmax in float32."""
    def guarded(q, k, v, pack):
        v_scale = power_of_two_at_least(v.abs().amax())
        return attend(q.half(), k.half(), (v / v_scale).half(), pack).float() * v_scale
    return guarded


def guard_float16(model):
    """The one call site: every linear layer of a float32-loaded model swapped for Float16Linear,
    its attention wrapped (float16_attention). The embedding table is a lookup, no matmul: it stays.
    On CUDA, cuBLAS is told to keep float16 GEMMs' reductions in float32."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, StoredLinear)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Float16Linear(module))
    model.attend = float16_attention(model.attend)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    return model


# ------------------------------------------------------------------------------ choosing a format

def read_header(file, offsets=False):
    """{key: (shape, dtype)} from a safetensors file's JSON header, without reading a tensor; with
    offsets, {key: the byte offset where its data starts} instead."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if offsets:
        return {k: 8 + n + v["data_offsets"][0] for k, v in header.items()}
    return {k: (v["shape"], SAFETENSORS_DTYPES.get(v["dtype"], torch.float32))
            for k, v in header.items()}


def weight_bytes(tensors, fmt, dtype):
    """Bytes the weights take in memory in a format; tensors: {key: (shape, dtype on disk)}."""
    total = 0
    for key, (shape, source) in tensors.items():
        n, bits = math.prod(shape), bits_of(key, fmt) if len(shape) == 2 else None
        if len(shape) != 2:
            total += n * dtype.itemsize
        elif bits == 8:
            total += n + 2 * n // GROUP                    # q, a float16 scale per group
        elif bits == 4:
            # q, two 8-bit codes per group, two float32 steps per row
            total += n // 2 + 2 * n // GROUP + 8 * shape[0]
        else:
            total += n * stored_dtype(source, dtype).itemsize
    return total


def bits_per_weight(tensors, fmt):
    """Bits per weight of the 2-D tensors (the linear layers and the embedding table), scales
    included."""
    matrices = {k: v for k, v in tensors.items() if len(v[0]) == 2}
    n_weights = sum(math.prod(shape) for shape, _ in matrices.values())
    return 8 * weight_bytes(matrices, fmt, torch.float32) / n_weights


def batch_room(config, tensors, dtype, batch_tokens):
    """Memory a forward pass needs beside the weights: one batch's activations, the largest linear
    weight converted to the compute dtype (twice: the int8 -> fp32 product and its cast), and the
    runtime itself."""
    largest = max(math.prod(shape) for k, (shape, _) in tensors.items()
                  if len(shape) == 2 and "embed" not in k)
    return activation_bytes(config, dtype) * batch_tokens + 2 * largest * 4 + RUNTIME_BYTES


def choose_format(quantize, tensors, config, dtype, batch_tokens, budget):
    """(format, one line saying why): the run's one decision, before any weight is read.
    quantize: "auto", or a format of FORMATS ("none" is as shipped); auto takes the first of as
    shipped, int8, int4 whose weights plus room for a batch fit the budget. budget: (bytes, how it
    was found). Raises ValueError if the chosen (or every) format does not fit."""
    if quantize not in ("auto", *FORMATS):
        raise ValueError(f"--quantize must be auto, none, int8 or int4, got {quantize!r}")
    room = batch_room(config, tensors, dtype, batch_tokens)
    sizes = {fmt: weight_bytes(tensors, fmt, dtype) for fmt in FORMATS}
    stored = "/".join(sorted({dtype_name(stored_dtype(source, dtype))
                              for shape, source in tensors.values() if len(shape) == 2}))
    free, where = budget
    fits = [fmt for fmt in (FORMATS if quantize == "auto" else (quantize,))
            if sizes[fmt] + room <= free]
    if not fits:
        raise ValueError(f"the model does not fit: its weights need {sizes['none'] / GB:.1f} GB "
                         f"{stored} as shipped, {sizes['int8'] / GB:.1f} GB in int8 or "
                         f"{sizes['int4'] / GB:.1f} GB in int4, plus {room / GB:.1f} GB for a "
                         f"batch; {where}"
                         + ("" if quantize == "auto" else f" (--quantize {quantize})"))
    fmt = fits[0]
    shipped = "/".join(sorted({dtype_name(source) for shape, source in tensors.values()
                               if len(shape) == 2}))
    kept = f"as shipped, {stored}" if stored == shipped else (  # fp32 weights, bf16 compute
        f"stored {shipped}, kept in {stored} (converted while loading)")
    name = {"none": kept, "int8": "int8",
            "int4": f"int4 ({' and '.join(k.split('.')[0] for k in MIXED_8BIT)} in int8)"}[fmt]
    tried = FORMATS[:FORMATS.index(fmt)] if quantize == "auto" else ()
    why = "".join(f"{'as shipped' if f == 'none' else f} they need {sizes[f] / GB:.1f} GB; "
                  for f in tried)
    why = why or (f"--quantize {fmt}; " if fmt != "none" else "")
    return fmt, (f"weights: {name}, {sizes[fmt] / GB:.1f} GB, computing in {dtype_name(dtype)} "
                 f"({why}{where})")
