"""The research modes of train.py, on the same rows, split, cache and training loop: a head sweep
(--sweep N), one head per layer and pooling from one forward pass (--layer-sweep,
--compare-pooling), and LoRA fine-tuning of the embedder itself with the head (--lora-rank R).

    python train.py --data train.csv --model Qwen/Qwen3-8B --group-col QuestionId --sweep 200
    python train.py --data train.csv --model Qwen/Qwen3-8B --layer-sweep --compare-pooling
    python train.py --data train.csv --model Qwen/Qwen3-Embedding-0.6B --lora-rank 8 --out runs/lora

It builds on train.py (imported here; train.py imports this file only when a mode is asked for).
"""

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import NamedTuple

import torch

import train
from at_scale import embed_cache, fingerprint
from at_scale.embed_cache import Measured
from at_scale.embedder import Embedder
from at_scale.lora import add_lora, check_lora, checkpoint_blocks
from at_scale.runtime import dtype_name, pick_device
from at_scale.weights import checkpoint_tensors
from cli import check_ranges, log, refuse_given
from data import write_tables
import fit
from fit import interrupted, make_head, score_head, train_head, train_loop
from qwen_embed import POOLINGS, Qwen3Config


def run(args, spec, options, data, task, results):
    """The mode the flags ask for -> the results (with --out: its tables, or its checkpoint)."""
    if not args.out:
        log("no --out: the tables and per-epoch history of this run are printed, not saved (--out "
            "DIR keeps them as CSV)")
    if args.layer_sweep or args.compare_pooling:
        return layer_sweep(args, spec, options, data, task, results)
    if args.lora_rank:  # fine-tuning: no cached vectors, they change as the adapters learn
        with interrupted(lambda: "while fine-tuning"):
            fitted, spec, fidelity, folder = train_lora(args, spec, data.texts, task)
        identity = fingerprint.model_identity(folder, args.cache_dir, log)
        return train.finish(args, data, task, fitted, results, spec, Measured(identity, fidelity))
    stored = train.cache_vectors(args, spec, options, data)
    if stored is None:  # a torchrun rank other than 0
        return None
    vectors = stored[args.pooling, args.layer]
    fitted = fit_sweep(args, vectors.load(), task)
    return train.finish(args, data, task, fitted, results, vectors.spec,
                        Measured(vectors.model_identity, vectors.cache.info().get("fidelity")))


def check_flags(args):
    """The research flags checked before any work (a Hub model's layer count once it is read)."""
    check_ranges([
        ("--sweep", args.sweep, args.sweep >= 0, "0 (no sweep) or a number of trials"),
        ("--lora-alpha", args.lora_alpha, args.lora_alpha > 0, "positive"),
        ("--lora-lr", args.lora_lr, args.lora_lr > 0, "positive"),
        ("--lora-layers", args.lora_layers, args.lora_layers is None or args.lora_layers >= 1,
         "between 1 and the model's layers"),
    ])
    if (args.sweep or args.layer_sweep or args.compare_pooling) and args.folds:
        raise ValueError("--sweep, --layer-sweep and --compare-pooling use one split: drop --folds")
    for mode, dests, why in ignored(args):
        refuse_given(args, dests, mode, why)
    if args.lora_rank:  # a local config is read; a Hub model is checked once loaded
        config = Path(args.model) / "config.json"
        n_layers = Qwen3Config.from_json(config).num_hidden_layers if config.is_file() else None
        check_lora(n_layers, args.lora_rank, args.lora_targets.split(","), args.lora_layers)
        if args.sweep or args.folds or args.layer_sweep or args.compare_pooling or \
                args.layer is not None:
            raise ValueError("--lora-rank trains on one split and the final layer: drop --sweep, "
                             "--folds, --layer-sweep, --compare-pooling and --layer")


# What LoRA does not use of the embedding flags: it caches no vectors and runs the model eagerly.
LORA_IGNORES = ("compile", "cache_chunk", "cache_seconds", "batch_size", "max_batch_tokens")
LORA_ONLY = set()  # the LoRA group's flags but --lora-rank, filled by add_flags from the parser


def ignored(args):
    """(mode, the flags' dests it ignores or sets itself, which of the two) for the modes asked
    for: a flag given for them would be dropped without a word."""
    found = [("--folds", {"val_frac"}, "ignores")] if args.folds else []
    if args.sweep:  # the search space's own names
        found.append(("--sweep", set(sample_head_config(random.Random(0))), "sets itself"))
    if args.layer_sweep:
        found.append(("--layer-sweep", {"layer"}, "sets itself"))
    if args.compare_pooling:
        found.append(("--compare-pooling", {"pooling"}, "sets itself"))
    found.append(("--lora-rank", set(LORA_IGNORES), "ignores") if args.lora_rank else
                 ("a run without --lora-rank", LORA_ONLY, "ignores"))
    return found


def add_flags(p):
    r = p.add_argument_group("research modes (research.py)")
    r.add_argument("--layer-sweep", action="store_true",
                   help="one forward pass, a head per layer, a table of val MAP@3")
    r.add_argument("--compare-pooling", action="store_true",
                   help="the same for last and mean pooling")
    r.add_argument("--sweep", type=int, default=0,
                   help="try N random head configurations, rank them, save the best")
    t = p.add_argument_group("fine-tuning the embedder with LoRA (at_scale/lora.py)")
    t.add_argument("--lora-rank", type=int, default=0,
                   help="rank of the adapters; 0: frozen vectors (cached)")
    t.add_argument("--lora-alpha", type=float, default=16,
                   help="the adapters' output is scaled by alpha / rank")
    t.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help="comma-separated linear layers to adapt")
    t.add_argument("--lora-layers", type=int, default=None,
                   help="adapt the top N blocks; None: all")
    t.add_argument("--lora-lr", type=float, default=2e-4, help="peak learning rate of the adapters")
    t.add_argument("--grad-checkpoint", action="store_true", help="recompute each block's "
                   "activations in the backward pass: less memory, about a third more time")
    LORA_ONLY.update(a.dest for a in t._group_actions if a.dest != "lora_rank")


# ----------------------------------------------------------------------------- the head sweep

class Trial(NamedTuple):
    """One --sweep trial: its head configuration and score."""
    index: int
    config: dict
    map3: float  # validation MAP@3
    seconds: float


def fit_sweep(args, x, task):
    """--sweep N random head configurations on the same vectors and split. Only the best trial's
    head and probabilities are kept; the others are scored and dropped."""
    rng, trials, best, history = random.Random(args.seed), [], None, []

    def progress():  # for Ctrl-C
        return f"after {len(trials)} of {args.sweep} sweep trials" + (
            f" (best so far: trial {best.index}, val MAP@3 {best.map3:.4f}, "
            f"{json.dumps(best.config)})" if best else "")

    tr, va = task.tr, task.va
    with interrupted(progress):
        for i in range(args.sweep):
            config = sample_head_config(rng)
            t0 = time.time()
            try:
                head, result = train_head(x[tr], task.y[tr], x[va], task.y[va], task.labels,
                                          argparse.Namespace(**{**vars(args), **config}))
            except FloatingPointError as e:  # a diverged trial fails alone; the sweep goes on
                log(f"trial {i:3d}: failed ({e})  {json.dumps(config)}")
                continue
            trials.append(Trial(i, config, result.scores.map3, time.time() - t0))
            history += [{"trial": i, **row} for row in result.history]
            if best is None or trials[-1].map3 > best.map3:
                best, best_head, best_probs = trials[-1], head, result.scores.probs
            del head, result  # only the best trial's head and probabilities stay
            log(f"trial {i:3d}: val MAP@3 {trials[-1].map3:.4f}  {json.dumps(config)}  "
                f"{trials[-1].seconds:.1f}s")
    if not trials:
        raise FloatingPointError(f"every one of the {args.sweep} sweep trials diverged")
    trials.sort(key=lambda t: (-t.map3, t.index))
    print_table(["rank", "trial", "val MAP@3", "hidden", "dropout", "lr", "wd", "smooth", "epochs",
                 "time"],
                [[r + 1, t.index, f"{t.map3:.4f}", "x".join(map(str, t.config["hidden"])),
                  t.config["dropout"], f"{t.config['lr']:.2e}", t.config["weight_decay"],
                  t.config["label_smoothing"], t.config["epochs"], f"{t.seconds:.1f}s"]
                 for r, t in enumerate(trials)])
    table = [{"rank": r + 1, "trial": t.index, "val_map3": t.map3, **t.config,
              "hidden": "x".join(map(str, t.config["hidden"])), "seconds": t.seconds}
             for r, t in enumerate(trials)]
    results = {"best_trial": best.index, "val_map3": best.map3,
               "sweep": [[t.index, t.map3, t.config] for t in trials]}
    tables = {"history.csv": history, "sweep.csv": table}
    return fit.Fitted([best_head], va, best_probs, results, tables, best.config)


def sample_head_config(rng):
    """One random head configuration for --sweep."""
    return {"hidden": rng.choice([[256, 128], [512, 256], [1024, 512], [2048, 1024]]),
            "dropout": rng.choice([0.0, 0.1, 0.2, 0.3, 0.5]), "lr": 10 ** rng.uniform(-4, -2.5),
            "weight_decay": rng.choice([0.0, 1e-4, 1e-2, 0.1]),
            "label_smoothing": rng.choice([0.0, 0.05, 0.1]), "epochs": rng.choice([10, 20, 30, 50])}


# ----------------------------------------------------------------------------- the layer sweep

def layer_sweep(args, spec, options, data, task, results):
    """One forward pass pools every layer (and both poolings); then one head per (pooling, layer),
    each trained with only that layer's vectors in memory."""
    poolings = list(POOLINGS) if args.compare_pooling else None
    layers = "all" if args.layer_sweep else None
    stored = train.cache_vectors(args, spec, options, data, poolings, layers)
    if stored is None:  # a torchrun rank other than 0
        return None
    table, rows, history = [], [], []
    tr, va = task.tr, task.va
    with interrupted(lambda: f"after {len(table)} of {len(stored)} layer-sweep heads"):
        for (pooling, layer), vectors in stored.items():
            t0 = time.time()
            x = vectors.load()
            _, best = train_head(x[tr], task.y[tr], x[va], task.y[va], task.labels, args)
            del x  # one layer's vectors in memory at a time
            name = "final (normed)" if layer is None else str(layer)
            table.append([pooling, name, f"{best.scores.map3:.4f}", f"{best.scores.acc:.4f}",
                          best.epoch, f"{time.time() - t0:.1f}s"])
            rows.append({"pooling": pooling, "layer": "final" if layer is None else layer,
                         **fit.best_results(best), "seconds": time.time() - t0})
            history += [{"pooling": pooling, "layer": rows[-1]["layer"], **row}
                        for row in best.history]
    scores = [float(r[2]) for r in table]
    print_table(["pooling", "layer", "val MAP@3", "val acc", "best epoch", "time", ""],
                [r + [score_bar(s, min(scores), max(scores))] for r, s in zip(table, scores)])
    results = {**results, "table": table}
    if args.out:  # no head is kept: the folder holds what the sweep learned
        write_tables(args.out, {"layer_sweep.csv": rows, "history.csv": history},
                     {"args.json": json.dumps(vars(args), indent=2),
                      "results.json": json.dumps(results, indent=2)})
        log(f"wrote {args.out}/ (layer_sweep.csv, history.csv, args.json, results.json)")
    return results


def print_table(header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    for line in [header] + rows:
        log("  ".join(str(v).rjust(w) if i < len(header) - 1 else str(v)
                      for i, (v, w) in enumerate(zip(line, widths))))


def score_bar(value, low, high, width=24):
    """A text bar from low (empty) to high (full), so the best rows of a table stand out."""
    return "#" * (width if high <= low else round((value - low) / (high - low) * width))


# ----------------------------------------------------------------------------- LoRA

def train_lora(args, spec, texts, task):
    """--lora-rank R: adapters on the frozen Qwen3 (lora.py) and the head, trained together in
    train_loop on the pooled EOS state: each step runs the model on a batch of texts, with
    gradients, instead of reading cached vectors. Returns (Fitted, the spec as the run decided
    it, measure_fidelity's figures on a quantized base or None, the base model's folder)."""
    embedder, spec, lora, fidelity = lora_model(args, spec, texts)
    model, head_device = embedder.model, pick_device(args.head_device or embedder.device)
    head, group = make_head(spec.dim or embedder.dim, len(task.labels), args, head_device)
    adapters = {"params": list(lora.values()), "lr": args.lora_lr, "peak": args.lora_lr,
                "weight_decay": 0.0, "name": "lora"}
    ids = embedder.tokenize(texts, spec.instruction, spec.max_length, spec.eos)
    tr, va, y = task.tr, task.va, task.y
    loss = fit.make_loss(args, y[tr])  # the frozen heads' loss, built by the one builder

    def batch_loss(idx):  # the model with gradients on these texts, pooled and L2-normed as cached
        rows = tr[idx].tolist()
        lengths = torch.tensor([len(ids[i]) for i in rows])
        flat = torch.tensor([t for i in rows for t in ids[i]]).to(embedder.device)
        v = embedder.pool(model(flat, lengths), lengths, spec.pooling, spec.dim, normalize=True)
        return loss(head(v.to(head_device)), y[tr[idx]].to(head_device))

    def validate():
        if not len(va):
            return None
        x_va = embedder.encode([texts[i] for i in va.tolist()], spec.instruction,
                               max_length=spec.max_length, dim=spec.dim, pooling=spec.pooling,
                               progress=False, append_eos=spec.eos)
        return score_head(head, x_va, y[va], task.labels)

    def snapshot():
        return {"head": {k: v.clone() for k, v in head.state_dict().items()},
                "lora": {k: v.detach().clone() for k, v in lora.items()}}

    best = train_loop(head, [group, adapters], len(tr), batch_loss, validate, snapshot, args,
                      tag="")
    head.load_state_dict(best.state["head"])
    fit.say_best(args, best, task)
    lora = {k: v.cpu() for k, v in best.state["lora"].items()}
    results = {**fit.best_results(best),
               "lora_trainable_params": sum(t.numel() for t in lora.values())}
    fitted = fit.Fitted([head.cpu().eval()], va, best.scores.probs, results,
                        {"history.csv": best.history}, lora=lora)
    return fitted, spec, fidelity, embedder.folder


def lora_model(args, spec, texts):
    """The embedder with its adapters added (seeded) -> (embedder, the spec with its dtype and
    weight format as decided, the adapters' tensors, measure_fidelity's figures or None)."""
    embedder = Embedder.from_pretrained(spec.model, device=args.device, dtype=spec.dtype,
                                        compile=False, quantize=spec.weights,
                                        max_memory=args.max_memory, log=log)
    spec = dataclasses.replace(spec, dtype=dtype_name(embedder.dtype),
                               weights=embedder.weight_format)
    fidelity = embed_cache.measure_sample(embedder, texts, args.fidelity_texts, spec, log)
    model = embedder.model
    torch.manual_seed(args.seed)  # same seed: same adapters, head, batches, dropout
    lora = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets.split(","),
                    args.lora_layers)
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    n_params = sum(math.prod(shape) for shape, _ in checkpoint_tensors(embedder.folder).values())
    log(f"LoRA: rank {args.lora_rank}, alpha {args.lora_alpha}, {args.lora_targets} in the top "
        f"{args.lora_layers or len(model.layers)} of {len(model.layers)} blocks: "
        f"{sum(p.numel() for p in lora.values()):,} trainable parameters (the model has "
        f"{n_params:,}); vectors are not cached")
    return embedder, spec, lora, fidelity


