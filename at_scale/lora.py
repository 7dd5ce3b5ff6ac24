"""LoRA: low-rank adapters on the frozen linear layers of qwen_embed's Qwen3, for fine-tuning.

    adapters = add_lora(model, rank=8, alpha=16, targets=["q", "v"], layers=4)  # the top 4 blocks
    ...train the adapters (train.py --lora-rank 8 trains them with the head)...
    merge_lora(model)  # W <- W + (alpha / rank) B A: plain nn.Linear again, no cost at inference
    checkpoint_blocks(model)  # --grad-checkpoint: recompute each block in the backward pass
    lora_vectors(folder, lora, spec, texts, options)  # evaluate.py: a LoRA checkpoint's vectors

An adapted layer computes W x + (alpha / rank) B (A x). W stays frozen; A (rank, in) starts random
and B (out, rank) zero, so training starts from the base model's exact outputs and only
rank * (in + out) numbers per layer learn, instead of in * out. Same maths as peft's LoRA
(tests/test_lora.py checks the gradients against it). The base may be any frozen linear layer,
weights.StoredLinear included: adapters on an int8 base are QLoRA's recipe, and stay unmerged
there (merging would quantize the update away).
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from at_scale import embed_cache
from at_scale.embedder import Embedder

TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}


class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha):  # base: nn.Linear or weights.StoredLinear
        super().__init__()
        self.base, self.scale = base, alpha / rank
        # float32 even when the base is bf16: early updates are far below bf16's resolution of W.
        device = next(base.buffers(), None)  # nn.Linear: its weight; stored or float16: a buffer
        kw = dict(device=(base.weight if device is None else device).device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as peft does

    def forward(self, x):  # (N, in) -> (N, out)
        update = F.linear(F.linear(x.float(), self.lora_A), self.lora_B) * self.scale  # B (A x)
        return self.base(x) + update.to(x.dtype)


def check_lora(n_layers, rank, targets, layers):
    """One-line errors for bad --lora-* flags; n_layers None: the layer count is checked once the
    model is known (add_lora)."""
    if rank < 0:
        raise ValueError(f"--lora-rank must be 0 (no LoRA) or positive, got {rank}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"--lora-targets: unknown {unknown} (choose from {','.join(TARGETS)})")
    if layers is not None and not 1 <= layers <= (n_layers or layers):
        raise ValueError(f"--lora-layers must be between 1 and the model's {n_layers} layers, "
                         f"got {layers}")


def add_lora(model, rank, alpha, targets, layers=None):
    """Freeze every weight of model, then wrap the targets of the top `layers` blocks (None: all).
    Returns {name: parameter} of the adapters: what trains, and what a checkpoint saves."""
    check_lora(len(model.layers), rank, targets, layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers[len(model.layers) - (layers or len(model.layers)):]:
        for target in targets:
            parent, name = TARGETS[target].split(".")
            parent = getattr(block, parent)
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return adapters(model)


def adapters(model):
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}


def load_adapters(model, tensors, source):
    """Copy saved adapter tensors into a model prepared by add_lora; name what does not fit."""
    mine = adapters(model)
    missing, unexpected = sorted(mine.keys() - tensors.keys()), sorted(tensors.keys() - mine.keys())
    bad = [k for k in mine.keys() & tensors.keys() if mine[k].shape != tensors[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{source}: adapters do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, misshapen {bad[:3]})")
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(tensors[name])


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter whose base is a plain nn.Linear into its weight, W + (alpha / rank) B A,
    and put the plain layer back. Adapters on a stored base (int8, or bf16 computed in fp32) stay
    unmerged: rounding the update into that format would lose it. Returns how many stay."""
    kept = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear) and type(child.base) is nn.Linear:
                w = child.base.weight
                w.copy_((w.float() + child.scale * child.lora_B @ child.lora_A).to(w.dtype))
                setattr(module, name, child.base)
            elif isinstance(child, LoRALinear):
                kept += 1
    return kept


def checkpoint_blocks(model):
    """Gradient checkpointing, applied at one call site like compile: each block keeps only its
    input for the backward pass and recomputes the rest there (memory for about a third more
    time)."""
    for block in model.layers:
        block.forward = checkpointed(block.forward)


def checkpointed(forward):
    def run(*args):
        if torch.is_grad_enabled():  # training: keep only the input, recompute in backward
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)
    return run


def lora_vectors(folder, lora, spec, texts, options, log=print):
    """The vectors of a fine-tuned checkpoint (evaluate.py): spec's base model with the adapters
    saved in folder (lora: meta.json's entry), merged into the weights where the base is a plain
    layer, kept apart on an int8 base (merging would quantize the update away), then plain encode.
    Not cached: the cache holds the base model's vectors. options: embed_cache.RunOptions."""
    file = Path(folder) / lora["file"]
    if not file.is_file():  # before the base model loads, which can take minutes
        raise FileNotFoundError(f"{file}: missing from the checkpoint")
    embedder = Embedder.from_pretrained(spec.model, device=options.device, dtype=spec.dtype,
                                        compile=options.compile, quantize=spec.weights,
                                        max_memory=options.max_memory, log=log)
    embed_cache.measure_sample(embedder, texts, options.fidelity_texts, spec, log)
    add_lora(embedder.model, lora["rank"], lora["alpha"], lora["targets"], lora["layers"])
    load_adapters(embedder.model, load_file(file), file)
    how = "kept apart, on a stored base" if merge_lora(embedder.model) else "merged"
    log(f"LoRA checkpoint (rank {lora['rank']}): adapters {how} in {spec.model}; vectors are not "
        f"cached")
    return embedder.encode(texts, spec.instruction, batch_size=options.batch_size,
                           max_length=spec.max_length, dim=spec.dim, pooling=spec.pooling,
                           max_batch_tokens=options.max_batch_tokens, progress=options.progress,
                           append_eos=spec.eos)
