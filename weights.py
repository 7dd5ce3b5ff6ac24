"""Weight formats: how the linear layers and the embedding table keep their weights, apart from
the dtype the model computes in. Applied at one call site (qwen_embed.load_weights); the forward
pass reads the same with or without them.

    as shipped  the checkpoint's dtype (bfloat16 for every Qwen3 release), or the compute dtype if
                that is narrower. Where compute is wider (float32 on a CPU without native bf16),
                each layer converts its weight inside the forward, one layer at a time: bf16 ->
                fp32 is exact, so the vectors equal a float32 copy's, at half its memory.
    int8        symmetric, per output channel (per row of the embedding table), float32 scales:
                w ~ q * scale, |w - q * scale| <= scale / 2. Quantized while loading, a block of
                rows at a time from the memory-mapped safetensors, never a full-precision copy.
                Dequantized before the matmul, in float32, then cast to the compute dtype.

choose_format() decides between them before any weight is read, from the safetensors headers and
the memory budget (runtime.memory_budget).
"""

import json
import math
import struct

import torch
import torch.nn.functional as F
from torch import nn

from runtime import GB, activation_bytes, dtype_name

ROWS_PER_READ = 4096  # int8: rows read, converted and quantized at once (the 8B's table: 16 MiB of bf16)
RUNTIME_BYTES = int(0.5 * GB)  # torch, the tokenizer and Python itself, measured at about 0.4 GB RSS
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


def quantize_int8(w):
    """(out, in) float -> (int8 (out, in), float32 (out,)): each row scaled so its largest |w| is 127."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize(q, scale):
    return q * scale[:, None]  # int8 * float32 promotes to float32 in one pass over the weight


class StoredLinear(nn.Module):
    """A frozen nn.Linear (no bias) whose weight is stored in int8 (with scale) or as shipped, and
    converted to the input's dtype right before the matmul."""

    def __init__(self, weight, scale=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)  # None: as shipped

    def full_weight(self, dtype):
        return (self.weight if self.scale is None else dequantize(self.weight, self.scale)).to(dtype)

    def forward(self, x):  # (N, in) -> (N, out)
        return F.linear(x, self.full_weight(x.dtype))


class StoredEmbedding(nn.Module):
    """nn.Embedding with a stored table: only the rows looked up are converted to dtype."""

    def __init__(self, weight, scale, dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.dtype = dtype  # the compute dtype: ids carry none

    def forward(self, ids):  # (N,) -> (N, hidden)
        rows = F.embedding(ids, self.weight)
        if self.scale is not None:
            rows = rows * self.scale[ids, None]
        return rows.to(self.dtype)


def stored_dtype(source, dtype):
    """As shipped: the checkpoint's dtype, or the compute dtype where that is narrower (fp32 -> bf16)."""
    return dtype if dtype.itemsize <= source.itemsize else source


def read_stored(f, key, fmt, dtype, device, file, offset):
    """One tensor of an open safetensors file, in its stored form: (tensor, int8 scales or None).
    Vectors (the norms' weights) are always in the compute dtype: they are tiny. file, offset:
    where the tensor's bytes start, for int8, which reads a block of rows at a time."""
    sliced = f.get_slice(key)
    shape = sliced.get_shape()
    if len(shape) != 2 or fmt != "int8":
        t = f.get_tensor(key)  # memory-mapped: the same dtype on the CPU stays a view of the file
        t = t.to(device=device, dtype=dtype if len(shape) != 2 else stored_dtype(t.dtype, dtype))
        return t, None
    source = SAFETENSORS_DTYPES[sliced.get_dtype()]
    q = torch.empty(shape, dtype=torch.int8, device=device)
    scale = torch.empty(shape[0], dtype=torch.float32, device=device)
    for start in range(0, shape[0], ROWS_PER_READ):  # a block of rows at a time: no full-precision copy
        stop = min(shape[0], start + ROWS_PER_READ)
        q[start:stop], scale[start:stop] = (t.to(device) for t in quantize_int8(
            read_rows(file, offset, shape, source, start, stop)))
    return q, scale


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


def apply_format(model, state, dtype):
    """Swap StoredLinear / StoredEmbedding in for every nn.Linear / nn.Embedding whose weight in
    state is not a plain dtype tensor (the call site: before load_state_dict(state, assign=True))."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        weight, scale = state[f"{name}.weight"], state.get(f"{name}.scale")
        if scale is None and weight.dtype == dtype:
            continue  # already what the forward computes in: the plain module, no conversion
        stored = StoredLinear(weight, scale) if isinstance(module, nn.Linear) else StoredEmbedding(weight, scale, dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, stored)


# ----------------------------------------------------------------------------- choosing a format

def read_header(file, offsets=False):
    """{key: (shape, dtype)} from a safetensors file's JSON header, without reading a tensor; with
    offsets, {key: the byte offset where its data starts} instead."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if offsets:
        return {k: 8 + n + v["data_offsets"][0] for k, v in header.items()}
    return {k: (v["shape"], SAFETENSORS_DTYPES.get(v["dtype"], torch.float32)) for k, v in header.items()}


def weight_bytes(tensors, fmt, dtype):
    """Bytes the weights take in memory in a format; tensors: {key: (shape, dtype on disk)}."""
    total = 0
    for shape, source in tensors.values():
        n = math.prod(shape)
        if len(shape) != 2:
            total += n * dtype.itemsize
        elif fmt == "int8":
            total += n + 4 * shape[0]
        else:
            total += n * stored_dtype(source, dtype).itemsize
    return total


def batch_room(config, tensors, dtype, batch_tokens):
    """Memory a forward pass needs beside the weights: one batch's activations, the largest linear
    weight converted to the compute dtype (twice: the int8 -> fp32 product and its cast), and the
    runtime itself."""
    largest = max(math.prod(shape) for k, (shape, _) in tensors.items() if len(shape) == 2 and "embed" not in k)
    return activation_bytes(config, dtype) * batch_tokens + 2 * largest * 4 + RUNTIME_BYTES


def choose_format(quantize, tensors, config, dtype, batch_tokens, budget):
    """(format, one line saying why). quantize: "auto", "none" (as shipped) or "int8"; auto takes
    as shipped if the weights plus room for a batch fit the budget, else int8 if that fits.
    budget: (bytes, how it was found). Raises ValueError, before any weight is read, if the
    chosen (or every) format does not fit."""
    if quantize not in ("auto", "none", "int8"):
        raise ValueError(f"--quantize must be auto, none or int8, got {quantize!r}")
    room = batch_room(config, tensors, dtype, batch_tokens)
    sizes = {fmt: weight_bytes(tensors, fmt, dtype) for fmt in ("none", "int8")}
    stored = "/".join(sorted({dtype_name(stored_dtype(source, dtype)) for shape, source in tensors.values()
                              if len(shape) == 2}))
    free, where = budget
    fits = [fmt for fmt in (("none", "int8") if quantize == "auto" else (quantize,)) if sizes[fmt] + room <= free]
    if not fits:
        raise ValueError(f"the model does not fit: its weights need {sizes['none'] / GB:.1f} GB {stored} "
                         f"as shipped or {sizes['int8'] / GB:.1f} GB in int8, plus {room / GB:.1f} GB for a batch; "
                         f"{where}" + ("" if quantize == "auto" else f" (--quantize {quantize})"))
    fmt = fits[0]
    name = "int8" if fmt == "int8" else f"as shipped, {stored}"
    why = (f"as shipped they need {sizes['none'] / GB:.1f} GB; " if fmt == "int8" and quantize == "auto"
           else "--quantize int8; " if fmt == "int8" else "")
    return fmt, f"weights: {name}, {sizes[fmt] / GB:.1f} GB ({why}{where})"

