"""The classifier on top of frozen Qwen3 vectors: a 3-layer MLP, saved as safetensors + JSON, and
how its predictions are scored (top_k labels, the competition's MAP@3).

A checkpoint is a folder:
    meta.json          labels (index order), head hyperparameters, the embedding spec, head files
    head.safetensors   the weights (with --folds K: head-0.safetensors ... head-{K-1}.safetensors)
No pickle anywhere: loading a checkpoint reads tensors and JSON, it can never run code.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data import atomic_path

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class MLPHead(nn.Module):
    """in_dim -> hidden[0] -> hidden[1] -> n_classes, activation and dropout between layers."""

    def __init__(self, in_dim, n_classes, hidden=(1024, 512), dropout=0.2, activation="gelu",
                 input_norm=False):
        super().__init__()
        self.hparams = dict(in_dim=in_dim, n_classes=n_classes, hidden=list(hidden),
                            dropout=dropout, activation=activation, input_norm=input_norm)
        act = ACTIVATIONS[activation]
        h1, h2 = hidden
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim) if input_norm else nn.Identity(),
            nn.Dropout(dropout),  # on the input too: the vectors are frozen, the main regulariser
            nn.Linear(in_dim, h1), act(), nn.Dropout(dropout),
            nn.Linear(h1, h2), act(), nn.Dropout(dropout),
            nn.Linear(h2, n_classes),
        )

    def forward(self, x):  # (B, in_dim) -> (B, n_classes) logits
        return self.net(x)


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
        head = MLPHead(**meta["head"])  # the constructor's own arguments, saved by save_checkpoint
        try:
            head.load_state_dict(load_file(folder / file))
        except Exception as e:
            raise ValueError(f"{folder / file}: unreadable or does not match meta.json "
                             f"({str(e).splitlines()[0]})") from None
        heads.append(head.eval())
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
