"""The classifier on top of frozen Qwen3 vectors: a 3-layer MLP, saved as safetensors + JSON, and
how its predictions are scored (top_k labels, the competition's MAP@3).

A checkpoint is a folder:
    meta.json          labels (index order), head hyperparameters, the embedding spec, head files
    head.safetensors   the weights (with --folds K: head-0.safetensors ... head-{K-1}.safetensors)
No pickle anywhere: loading a checkpoint reads tensors and JSON, it can never run code.
"""

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from data import atomic_path

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class MLPHead(nn.Module):
    """in_dim -> hidden[0] -> hidden[1] -> n_classes, activation and dropout between layers.

    Each layer is a named attribute, so a saved head's weights are named for what they are
    (fc1.weight), not for their place in a list: a layer added later shifts no other name."""

    def __init__(self, in_dim, n_classes, hidden=(1024, 512), dropout=0.2, activation="gelu",
                 input_norm=False):
        given = locals()
        super().__init__()
        # What load_head rebuilds this head from: every argument of this constructor, read from its
        # signature, so that a new option is saved and loaded with no list to keep in step.
        self.hparams = {name: list(given[name]) if isinstance(given[name], tuple) else given[name]
                        for name in head_options()}
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        h1, h2 = hidden
        self.input_norm = nn.LayerNorm(in_dim) if input_norm else nn.Identity()
        # dropout on the input too: the vectors are frozen, it is the main regulariser
        self.drop = nn.Dropout(dropout)
        self.fc1, self.fc2 = nn.Linear(in_dim, h1), nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, n_classes)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x):  # (B, in_dim) -> (B, n_classes) logits
        x = self.drop(self.input_norm(x))
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.act(self.fc2(x)))
        return self.fc3(x)


def head_options():
    """The names of MLPHead's constructor arguments: what a checkpoint's "head" entry holds."""
    return list(inspect.signature(MLPHead.__init__).parameters)[1:]


# Heads saved before the layers had names kept them in an nn.Sequential, named by position.
POSITIONAL_NAMES = {"net.0.": "input_norm.", "net.2.": "fc1.", "net.5.": "fc2.", "net.8.": "fc3."}


def head_loss(logits, y, label_smoothing=0.0):
    """The loss every head trains on (train.py's frozen heads and LoRA alike): cross-entropy, its
    targets smoothed by label_smoothing (0: none)."""
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def load_head(hparams, tensors, source):
    """An MLPHead from its meta.json hyperparameters and saved tensors, by name; tensors saved by
    position (before names) are renamed. A head that does not fit names what is missing and what
    is unexpected; an option this code does not know is refused, never dropped."""
    unknown = sorted(hparams.keys() - set(head_options()))
    if unknown:
        raise ValueError(f"{source}: meta.json's head has option(s) {unknown} that this version "
                         f"of MLPHead does not know (a checkpoint of newer code?)")
    try:
        head = MLPHead(**hparams)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: meta.json's head: {e}") from None
    for old, new in POSITIONAL_NAMES.items():
        tensors = {new + k.removeprefix(old) if k.startswith(old) else k: v
                   for k, v in tensors.items()}
    mine = head.state_dict()
    missing, unexpected = sorted(mine.keys() - tensors.keys()), sorted(tensors.keys() - mine.keys())
    misshapen = sorted(k for k in mine.keys() & tensors.keys() if mine[k].shape != tensors[k].shape)
    if missing or unexpected or misshapen:
        raise ValueError(f"{source}: does not match meta.json's head: missing {missing}, "
                         f"unexpected {unexpected}, misshapen {misshapen}")
    head.load_state_dict(tensors)
    return head


def save_checkpoint(folder, heads, labels, embedding, extra=None, files=None, tensors=None):
    """Write the whole folder under a temporary name, then rename: never half a checkpoint.
    extra: more meta.json entries (e.g. metrics); files: {name: text} written beside; tensors:
    {name: {key: tensor}} written beside as safetensors (LoRA adapters)."""
    names = [f"head-{k}.safetensors" for k in range(len(heads))]
    names = ["head.safetensors"] if len(heads) == 1 else names
    meta = {"labels": list(labels), "head": heads[0].hparams, "embedding": embedding,
            "heads": names, **(extra or {})}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for head, file in zip(heads, names):
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp / file))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, state in (tensors or {}).items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / name))
    return meta


def load_checkpoint(folder):
    """(heads in eval mode, meta). Clear errors for a folder that is not a complete checkpoint."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint (no meta.json)")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        missing = {"heads", "head", "labels", "embedding"} - meta.keys()
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{folder / 'meta.json'}: not a valid checkpoint description "
                         f"({e})") from None
    if missing:
        raise ValueError(f"{folder / 'meta.json'}: not a valid checkpoint description "
                         f"(no {sorted(missing)})")
    heads = []
    for file in meta["heads"]:
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file}: missing from the checkpoint")
        try:
            tensors = load_file(folder / file)
        except Exception as e:
            raise ValueError(f"{folder / file}: not a readable safetensors file "
                             f"({str(e).splitlines()[0]})") from None
        # the constructor's own arguments, saved by save_checkpoint
        heads.append(load_head(meta["head"], tensors, folder / file).eval())
    return heads, meta


@torch.no_grad()
def predict_proba(heads, x, batch_size=4096):
    """Mean of the heads' softmax probabilities: one head, or a fold ensemble. (N, in) ->
    (N, classes)."""
    out, device = [], next(heads[0].parameters()).device
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        out.append(torch.stack([h(xb).softmax(-1) for h in heads]).mean(0))
    return torch.cat(out) if out else torch.empty(0, heads[0].hparams["n_classes"], device=device)


def top_k(probs, labels, k=3):
    """The k most probable labels per row, best first, all distinct."""
    idx = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return [[labels[j] for j in row] for row in idx.tolist()]


def map_at_k(truth, predictions, k=3):
    """The competition's MAP@3: 1/rank of the first correct label among the first k predictions,
    else 0, averaged over rows. A label repeated in a row's predictions counts at its first rank."""
    total = 0.0
    for y, preds in zip(truth, predictions, strict=True):
        for rank, p in enumerate(preds[:k], start=1):
            if p == y:
                total += 1 / rank
                break
    return total / len(truth) if truth else 0.0
