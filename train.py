"""Train a 3-layer MLP on frozen Qwen3 vectors: CSV -> texts -> cached vectors -> head -> checkpoint

    python train.py --data train.csv --model Qwen/Qwen3-Embedding-0.6B --group-col QuestionId \
        --out runs/map

The first run embeds every text (the only expensive step) and caches the vectors; later runs that
change only head flags (--epochs, --lr, --hidden, ...) read the cache and run no forward pass.
With --lora-rank R the embedder itself is fine-tuned instead: LoRA adapters (lora.py) and the head
train together, on vectors computed afresh at every step. Both go through one loop, train_loop.
`python train.py --help` lists every flag; the work is in main(args), importable by tests. The
file reads from main down, in the order of the calls.
"""

import argparse
import csv
import dataclasses
import io
import json
import math
import random
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import cli
import embed_cache
from data import (CORRECT_SUFFIX, MAP_TEMPLATE, DiskFullError, atomic_path, check_ids, kfold,
                  labels_of, map_correct_answers, read_csv, require_columns, row_texts, split)
from embed_cache import EmbedSpec
from lora import add_lora, check_lora, checkpoint_blocks
from mlp_head import ACTIVATIONS, MLPHead, head_loss, map_at_k, predict_proba, save_checkpoint, top_k
from qwen_embed import POOLINGS, Qwen3Config, Qwen3Embedder, checkpoint_tensors
from runtime import dtype_name, pick_device

sink = print  # where log() writes: main(args, log=...) points it elsewhere for one run


def log(line):
    """The run's one logger: every line a run says goes through here (tests collect them)."""
    sink(line)


# ----------------------------------------------------------------------------- the run

def main(args, log=print):
    """Train as the flags say; log: where the run's lines go (default: printed)."""
    global sink
    sink, before = log, sink
    try:
        return run(args)
    finally:
        sink = before


def run(args):
    """Flags checked, rows read, vectors cached (or LoRA trained), heads fitted, checkpoint written
    -> the results meta.json keeps."""
    spec, options = check_flags(args)
    data = load_rows(args)
    task = split_rows(args, data)
    results = {"n_labels": len(task.labels), "n_rows": len(task.y)}
    if not args.out and (args.layer_sweep or args.compare_pooling or args.sweep or args.folds):
        log("no --out: the tables and per-epoch history of this run are printed, not saved (--out "
            "DIR keeps them as CSV)")
    if args.layer_sweep or args.compare_pooling:
        return layer_sweep(args, spec, options, data, task, results)
    if args.lora_rank:  # fine-tuning: no cached vectors, they change as the adapters learn
        with interrupted(lambda: "while fine-tuning"):
            fitted, spec, fidelity = train_lora(args, spec, data.texts, task)
    else:
        stored = cache_vectors(args, spec, options, data)
        if stored is None:  # a torchrun rank other than 0, whose work ends here
            return None
        vectors = stored[args.pooling, args.layer]
        fit = fit_sweep if args.sweep else fit_folds if args.folds else fit_one
        fitted = fit(args, vectors.load(), task)
        # the spec as the run decided it (dtype, weights), and the fidelity measured when its
        # vectors were computed (by this run or an earlier one)
        spec, fidelity = vectors.spec, vectors.cache.info().get("fidelity")
    results.update(fitted.results)
    if args.out:
        embedding = {**dataclasses.asdict(spec), "text_template": data.template,
                     "label_cols": args.label_cols.split(","), "id_col": args.id_col,
                     "correct_answers": data.correct_answers, "fidelity": fidelity}
        save_run(args, data, task.labels, fitted, results, embedding)
    return results


def check_flags(args):
    """The flags checked before any work, never over the network (a Hub model's number of layers
    is checked once it is read) -> (EmbedSpec, embed_cache.RunOptions)."""
    spec = EmbedSpec(args.model, instruction=args.instruction, max_length=args.max_length,
                     pooling=args.pooling, layer=args.layer, dim=args.dim, dtype=args.dtype,
                     weights=args.quantize, eos=not args.no_eos)
    options = cli.run_options(args)
    if args.folds == 1 or args.folds < 0:
        raise ValueError(f"--folds must be 0 (one split by --val-frac) or at least 2, "
                         f"got {args.folds}")
    cli.check_ranges([  # each numeric flag's valid range, before any work (--seed: any integer)
        ("--val-frac", args.val_frac, 0 <= args.val_frac < 1, "in [0, 1)"),
        ("--hidden", args.hidden, min(args.hidden) >= 1, "two positive sizes"),
        ("--dropout", args.dropout, 0 <= args.dropout < 1, "in [0, 1)"),
        ("--epochs", args.epochs, args.epochs >= 1, "positive"),
        ("--lr", args.lr, args.lr > 0, "positive"),
        ("--warmup-frac", args.warmup_frac, 0 <= args.warmup_frac <= 1, "in [0, 1]"),
        ("--weight-decay", args.weight_decay, args.weight_decay >= 0, "0 or more"),
        ("--label-smoothing", args.label_smoothing, 0 <= args.label_smoothing < 1, "in [0, 1)"),
        ("--head-batch-size", args.head_batch_size, args.head_batch_size >= 1, "positive"),
        ("--sweep", args.sweep, args.sweep >= 0, "0 (no sweep) or a number of trials"),
        ("--lora-alpha", args.lora_alpha, args.lora_alpha > 0, "positive"),
        ("--lora-lr", args.lora_lr, args.lora_lr > 0, "positive"),
        ("--lora-layers", args.lora_layers, args.lora_layers is None or args.lora_layers >= 1,
         "between 1 and the model's layers"),
    ])
    if (args.sweep or args.layer_sweep or args.compare_pooling) and args.folds:
        raise ValueError("--sweep, --layer-sweep and --compare-pooling use one split: drop --folds")
    if args.lora_rank:  # a local config is read; a Hub model is checked once loaded
        config = Path(args.model) / "config.json"
        n_layers = Qwen3Config.from_json(config).num_hidden_layers if config.is_file() else None
        check_lora(n_layers, args.lora_rank, args.lora_targets.split(","), args.lora_layers)
        if args.sweep or args.folds or args.layer_sweep or args.compare_pooling or \
                args.layer is not None:
            raise ValueError("--lora-rank trains on one split and the final layer: drop --sweep, "
                             "--folds, --layer-sweep, --compare-pooling and --layer")
    return spec, options


class Data(NamedTuple):
    """The training CSV, as the run uses it."""
    rows: list  # one dict per CSV row
    texts: list  # each row's text to embed
    truth: list  # each row's label
    template: str  # --text-template, with --map-correct's column added if asked
    correct_answers: dict | None  # --map-correct: the answer taken as correct, per question


def load_rows(args):
    """The CSV, checked against the flags -> Data."""
    columns, rows = read_csv(args.data)
    require_columns(args.data, columns, [args.id_col], "--id-col")
    require_columns(args.data, columns, args.label_cols.split(","), "--label-cols")
    if args.group_col:
        require_columns(args.data, columns, [args.group_col], "--group-col")
    template, correct = args.text_template, None
    if args.map_correct:  # the answers are found from the labels: training data only
        require_columns(args.data, columns, ["QuestionId", "MC_Answer", "Category"],
                        "--map-correct")
        correct = map_correct_answers(rows)
        if "{AnswerIsCorrect}" not in template:
            template += CORRECT_SUFFIX
    texts = row_texts(args.data, columns, rows, template, correct)
    check_ids(args.data, rows, args.id_col)
    empty = [row[args.id_col] for row, t in zip(rows, texts) if not t.strip()]
    if empty:  # embedded all the same (EOS alone still gives a vector), but worth knowing
        log(f"warning: {len(empty)} rows render to an empty text, e.g. {args.id_col} {empty[:5]}")
    truth = labels_of(rows, args.label_cols.split(","))
    log(f"{args.data}: {len(rows)} rows, {len(set(truth))} labels")
    return Data(rows, texts, truth, template, correct)


class Task(NamedTuple):
    """The labels and the split: what every way of fitting a head shares."""
    labels: list  # the distinct labels, sorted: y indexes them
    y: torch.Tensor  # each row's label index
    truth: list  # each row's label
    tr: torch.Tensor  # training rows (every row with --folds)
    va: torch.Tensor  # validation rows (none with --folds: each fold validates its own)
    groups: list | None  # each row's --group-col value


def split_rows(args, data):
    """Data -> Task: label indexes and the split (seeded); --folds is checked here, before any
    forward pass."""
    labels = sorted(set(data.truth))
    index = {label: i for i, label in enumerate(labels)}
    y = torch.tensor([index[t] for t in data.truth])
    groups = [row[args.group_col] for row in data.rows] if args.group_col else None
    if args.folds:  # every row is validated once, in its fold
        kfold(data.truth, args.folds, groups, args.seed)
        tr, va = torch.arange(len(y)), torch.tensor([], dtype=torch.long)
    else:
        tr, va = (torch.tensor(i, dtype=torch.long)
                  for i in split(data.truth, args.val_frac, groups, args.seed))
    return Task(labels, y, data.truth, tr, va, groups)


def cache_vectors(args, spec, options, data, poolings=None, layers=None):
    """{(pooling, layer): embed_cache.Vectors} for the rows' texts, in one forward pass for all of
    them where any is missing; None on a torchrun rank other than 0."""
    t0 = time.time()
    stored = embed_cache.ensure_cached(data.texts, spec, options, poolings=poolings, layers=layers,
                                       ids=[row[args.id_col] for row in data.rows], log=log)
    if stored is not None:
        log(f"embeddings: {len(stored)} x ({len(data.texts)}, {next(iter(stored.values())).dim}) "
            f"in {time.time() - t0:.1f}s")
    return stored


# ------------------------------------------------------------------------- heads on cached vectors

class Fitted(NamedTuple):
    """What fitting heads gives a run to keep."""
    heads: list  # one per fold, else one
    val_idx: torch.Tensor  # the rows val_probs predicts
    val_probs: torch.Tensor  # (len(val_idx), labels) probabilities
    results: dict  # figures for meta.json
    tables: dict  # CSV file name -> rows (dicts)
    config: dict = {}  # --sweep: the winning head configuration
    lora: dict | None = None  # --lora-rank: the adapters' tensors


def fit_one(args, x, task):
    with interrupted(lambda: "while training the head"):
        head, best = train_head(x[task.tr], task.y[task.tr], x[task.va], task.y[task.va],
                                task.labels, args, tag="")
    say_best(args, best, task)
    return Fitted([head], task.va, best.scores.probs, best_results(best),
                  {"history.csv": best.history})


def say_best(args, best, task):
    """The run's summary line: the best epoch and its validation figures."""
    if len(task.va):
        log(f"best epoch {best.epoch}: val MAP@3 {best.scores.map3:.4f}, "
            f"val acc {best.scores.acc:.4f} "
            f"({len(task.tr)} train / {len(task.va)} val rows"
            f"{', grouped by ' + args.group_col if args.group_col else ''})")


def best_results(best):
    return {"val_map3": best.scores.map3, "val_acc": best.scores.acc, "val_loss": best.scores.loss,
            "best_epoch": best.epoch}


def fit_folds(args, x, task):
    results, tables = {}, {"history.csv": [], "folds.csv": []}
    if task.groups is not None:  # the competition's test asks train's questions: stratified CV too
        ungrouped = task._replace(groups=None)
        _, _, results["stratified"], tables = cross_validate(args, x, ungrouped, quiet=True)
    heads, oof, res, mine = cross_validate(args, x, task)
    tables = {name: tables[name] + rows for name, rows in mine.items()}
    return Fitted(heads, torch.arange(len(task.y)), oof, {**results, **res}, tables)


def cross_validate(args, x, task, quiet=False):
    """K heads, each validated on its held-out fold -> (heads, out-of-fold probabilities, results,
    tables: {"history.csv", "folds.csv"} rows). x is held once; each fold copies only its own
    split. quiet: no epoch lines (the extra stratified CV of a grouped run)."""
    fold = torch.tensor(kfold(task.truth, args.folds, task.groups, args.seed))
    heads, oof, maps, history, folds = [], torch.zeros(len(task.y), len(task.labels)), [], [], []
    kind = f"grouped by {args.group_col}" if task.groups else "stratified"
    def progress():  # for Ctrl-C
        done = f" (val MAP@3 of the folds done: {', '.join(f'{m:.4f}' for m in maps)})"
        return f"in fold {len(maps) + 1} of {args.folds}" + (done if maps else "")

    with interrupted(progress):
        for k in range(args.folds):
            tr, va = (fold != k).nonzero().flatten(), (fold == k).nonzero().flatten()
            head, best = train_head(x[tr], task.y[tr], x[va], task.y[va], task.labels, args,
                                    tag=None if quiet else f"fold {k}  ")
            heads.append(head)
            oof[va] = best.scores.probs
            maps.append(best.scores.map3)
            history += [{"cv": kind, "fold": k, **row} for row in best.history]
            folds.append({"cv": kind, "fold": k, **best_results(best), "val_rows": len(va)})
    res = {"fold_map3": maps, "map3_mean": statistics.mean(maps),
           "map3_std": statistics.stdev(maps), "cv": kind,
           "oof_map3": map_at_k(task.truth, top_k(oof, task.labels))}
    log(f"{args.folds}-fold MAP@3 {res['map3_mean']:.4f} ± {res['map3_std']:.4f}, "
        f"out-of-fold MAP@3 {res['oof_map3']:.4f} ({kind})")
    return heads, oof, res, {"history.csv": history, "folds.csv": folds}


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
            head, result = train_head(x[tr], task.y[tr], x[va], task.y[va], task.labels,
                                      argparse.Namespace(**{**vars(args), **config}))
            trials.append(Trial(i, config, result.scores.map3, time.time() - t0))
            history += [{"trial": i, **row} for row in result.history]
            if best is None or trials[-1].map3 > best.map3:
                best, best_head, best_probs = trials[-1], head, result.scores.probs
            del head, result  # only the best trial's head and probabilities stay
            log(f"trial {i:3d}: val MAP@3 {trials[-1].map3:.4f}  {json.dumps(config)}  "
                f"{trials[-1].seconds:.1f}s")
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
    return Fitted([best_head], va, best_probs, results, tables, best.config)


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
    stored = cache_vectors(args, spec, options, data, poolings, "all" if args.layer_sweep else None)
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
                         **best_results(best), "seconds": time.time() - t0})
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
    it, measure_fidelity's figures on a quantized base or None)."""
    embedder, spec, lora, fidelity = lora_model(args, spec, texts)
    model, head_device = embedder.model, pick_device(args.head_device or embedder.device)
    head, group = make_head(spec.dim or embedder.dim, len(task.labels), args, head_device)
    adapters = {"params": list(lora.values()), "lr": args.lora_lr, "peak": args.lora_lr,
                "weight_decay": 0.0, "name": "lora"}
    ids = embedder.tokenize(texts, spec.instruction, spec.max_length, spec.eos)
    tr, va, y = task.tr, task.va, task.y

    def batch_loss(idx):  # the model with gradients on these texts, pooled and L2-normed as cached
        rows = tr[idx].tolist()
        lengths = torch.tensor([len(ids[i]) for i in rows])
        flat = torch.tensor([t for i in rows for t in ids[i]]).to(embedder.device)
        v = embedder.pool(model(flat, lengths), lengths, spec.pooling, spec.dim, normalize=True)
        return head_loss(head(v.to(head_device)), y[tr[idx]].to(head_device), args.label_smoothing)

    def validate():
        if not len(va):
            return None
        x_va = embedder.encode([texts[i] for i in va.tolist()], spec.instruction,
                               max_length=spec.max_length, dim=spec.dim, pooling=spec.pooling,
                               progress=False, append_eos=spec.eos)
        return evaluate_head(head, x_va, y[va], task.labels)

    def snapshot():
        return {"head": {k: v.clone() for k, v in head.state_dict().items()},
                "lora": {k: v.detach().clone() for k, v in lora.items()}}

    best = train_loop(head, [group, adapters], len(tr), batch_loss, validate, snapshot, args,
                      tag="")
    head.load_state_dict(best.state["head"])
    say_best(args, best, task)
    lora = {k: v.cpu() for k, v in best.state["lora"].items()}
    results = {**best_results(best), "lora_trainable_params": sum(t.numel() for t in lora.values())}
    fitted = Fitted([head.cpu().eval()], va, best.scores.probs, results,
                    {"history.csv": best.history}, lora=lora)
    return fitted, spec, fidelity


def lora_model(args, spec, texts):
    """The embedder with its adapters added (seeded) -> (embedder, the spec with its dtype and
    weight format as decided, the adapters' tensors, measure_fidelity's figures or None)."""
    embedder = Qwen3Embedder.from_pretrained(spec.model, device=args.device, dtype=spec.dtype,
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


# ----------------------------------------------------------------------------- the training loop

def train_head(x_tr, y_tr, x_va, y_va, labels, args, tag=None):
    """A head on frozen vectors, on args.head_device (None: the embedding device); it comes back on
    the CPU with the best epoch's weights. tag: prefix of its epoch lines (None: not printed, as in
    sweeps, which print a table). Returns (head, Best)."""
    device = pick_device(args.head_device or args.device)
    x_tr, y_tr, x_va, y_va = (t.to(device) for t in (x_tr, y_tr, x_va, y_va))
    torch.manual_seed(args.seed)  # same seed, same init, same batches, same numbers (same device)
    head, group = make_head(x_tr.shape[1], len(labels), args, device)

    def batch_loss(idx):
        idx = idx.to(device)
        return head_loss(head(x_tr[idx]), y_tr[idx], args.label_smoothing)

    best = train_loop(head, [group], len(x_tr), batch_loss,
                      lambda: evaluate_head(head, x_va, y_va, labels) if len(x_va) else None,
                      lambda: {k: v.clone() for k, v in head.state_dict().items()}, args, tag)
    head.load_state_dict(best.state)
    return head.cpu().eval(), best._replace(state=None)


def make_head(in_dim, n_classes, args, device):
    head = MLPHead(in_dim, n_classes, args.hidden, args.dropout, args.activation, args.input_norm)
    head = head.to(device)
    group = {"params": list(head.parameters()), "lr": args.lr, "peak": args.lr,
             "weight_decay": args.weight_decay, "name": "head"}
    return head, group


class Best(NamedTuple):
    """What a training run keeps: its best epoch and that epoch's scores and state."""
    epoch: int
    scores: "Scores"
    history: list  # one dict per epoch: the numbers of its log line (history.csv)
    state: object  # snapshot() of the best epoch


def train_loop(head, groups, n_train, batch_loss, validate, snapshot, args, tag=None):
    """The one hand-written loop, for the frozen head and for LoRA: AdamW over the parameter groups
    (each with its own peak LR, warmup then cosine), the rows shuffled each epoch by a seeded
    generator, and the epoch with the best validation MAP@3 kept (the last one without validation).

    batch_loss(idx): the loss on training rows idx (0..n_train-1); validate(): Scores on the
    validation rows, or None if there are none; snapshot(): the tensors to keep of the best epoch;
    tag: prefix of the epoch lines, None: silent. Returns Best."""
    device = next(head.parameters()).device
    # fused: one kernel for the whole update, 1.7x faster steps on CPU for a 2048x1024 head
    opt = torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"))
    total = args.epochs * math.ceil(n_train / args.head_batch_size)
    warmup = int(args.warmup_frac * total)
    gen = torch.Generator().manual_seed(args.seed)
    best, step, history = None, 0, []
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        head.train()
        order = torch.randperm(n_train, generator=gen)
        train_loss = torch.zeros((), device=device)  # summed on the device: no wait for the GPU
        for start in range(0, n_train, args.head_batch_size):
            idx = order[start:start + args.head_batch_size]
            for group in opt.param_groups:
                group["lr"] = get_lr(step, total, warmup, group["peak"])
            loss = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_loss += loss.detach() * len(idx)
            step += 1
        val = validate() or Scores(*[float("nan")] * 3, torch.empty(0, head.hparams["n_classes"]))
        seconds = time.time() - t0
        lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(opt.param_groups)}
        history.append({"epoch": epoch, "train_loss": train_loss.item() / n_train,
                        "val_loss": val.loss, "val_acc": val.acc, "val_map3": val.map3,
                        "seconds": seconds, **lrs})
        if tag is not None:
            log(epoch_line(tag, history[-1], args.epochs))
        if best is None or math.isnan(val.map3) or val.map3 > best.scores.map3:  # nan: the last
            best = Best(epoch, val, history, snapshot())
    return best


def epoch_line(tag, row, epochs):
    """An epoch's log line, from its history.csv row."""
    val = "" if math.isnan(row["val_map3"]) else (
        f"val loss {row['val_loss']:.4f}  val acc {row['val_acc']:.4f}  "
        f"val MAP@3 {row['val_map3']:.4f}  ")
    return (f"{tag}epoch {row['epoch']:3d}/{epochs}  train loss {row['train_loss']:.4f}  "
            f"{val}{row['seconds']:.2f}s")


def get_lr(step, total_steps, warmup_steps, max_lr):
    # 1) linear warmup from max_lr / warmup_steps to max_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    # 2) cosine decay from max_lr down to 0 at the last step
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Scores(NamedTuple):
    """A head's scores on the validation rows."""
    loss: float
    acc: float
    map3: float
    probs: torch.Tensor  # (rows, classes) on the CPU


@torch.no_grad()
def evaluate_head(head, x, y, labels):
    """Scores on rows x with label indexes y."""
    head.eval()
    probs = predict_proba([head], x).cpu()
    y = y.cpu()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y).item() if len(y) else float("nan")
    preds = top_k(probs, labels)
    truth = [labels[i] for i in y.tolist()]
    acc = sum(p[0] == t for p, t in zip(preds, truth)) / max(1, len(truth))
    return Scores(loss, acc, map_at_k(truth, preds), probs)


@contextmanager
def interrupted(progress):
    """Ctrl-C in the head phase: say how far it got (progress() -> text). Nothing is written then:
    checkpoints are written whole at the end, never as if an unfinished sweep or CV had finished."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{progress()}; no checkpoint was written (the vectors are cached: "
                                f"a rerun goes straight to the head)") from None


# ----------------------------------------------------------------------------- what a run keeps

def save_run(args, data, labels, fitted, results, embedding):
    """The checkpoint folder: heads, meta.json (with the embedding spec evaluate.py needs), the
    flags that made it, the validation predictions, and the LoRA adapters if any."""
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow([args.id_col, "label", "top3"] + [f"p_{label}" for label in labels])
    top3, probs = top_k(fitted.val_probs, labels), fitted.val_probs.tolist()
    for i, p, pr in zip(fitted.val_idx.tolist(), top3, probs):
        w.writerow([data.rows[i][args.id_col], data.truth[i], " ".join(p)]
                   + [f"{v:.5f}" for v in pr])
    if fitted.lora:  # the adapters beside the head; evaluate.py applies them to the base model
        results["lora"] = {"rank": args.lora_rank, "alpha": args.lora_alpha,
                           "targets": args.lora_targets.split(","), "layers": args.lora_layers,
                           "file": "lora.safetensors"}
    flags = {**vars(args), **fitted.config}  # a sweep records its winning configuration
    files = {"args.json": json.dumps(flags, indent=2), "val_predictions.csv": table.getvalue(),
             **{name: table_csv(rows) for name, rows in fitted.tables.items()}}
    try:
        save_checkpoint(args.out, fitted.heads, labels, embedding, results, files=files,
                        tensors={"lora.safetensors": fitted.lora} if fitted.lora else None)
    except DiskFullError as e:
        tensors = [t for h in fitted.heads for t in h.state_dict().values()]
        tensors += list((fitted.lora or {}).values())
        need = sum(t.numel() * t.element_size() for t in tensors) + len(table.getvalue())
        rerun = "" if fitted.lora else (" (the vectors are cached: a rerun goes straight to "
                                        "the head)")
        raise DiskFullError(f"--out {args.out}: {e}; the checkpoint needs about {need / 1e6:.1f} MB"
                            f"{rerun}") from None
    log(f"wrote {args.out}/ (meta.json, {len(fitted.heads)} head file(s)"
        f"{', lora.safetensors' if fitted.lora else ''}, args.json, val_predictions.csv, "
        f"{', '.join(fitted.tables)})")


def table_csv(rows):
    """Rows of dicts -> CSV text, the columns in order of first appearance, numbers at full
    precision."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    w = csv.DictWriter(out, columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def write_tables(folder, tables, files=None):
    """A folder of CSV tables (and other text files), written whole under a temporary name."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        texts = {**{name: table_csv(rows) for name, rows in tables.items()}, **(files or {})}
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="data/example.csv", help="training CSV (header row, UTF-8)")
    d.add_argument("--text-template", default=MAP_TEMPLATE,
                   help="format string over column names: the text to embed")
    d.add_argument("--label-cols", default="Category,Misconception",
                   help="comma-separated; the label joins them with ':'")
    d.add_argument("--id-col", default="row_id", help="unique row id column")
    d.add_argument("--group-col", default=None, help="split by this column (e.g. QuestionId): no "
                   "group in both train and val; None: a split stratified by label")
    d.add_argument("--val-frac", type=float, default=0.2,
                   help="validation share (0: train on everything)")
    d.add_argument("--folds", type=int, default=0, help="K-fold cross-validation with K heads "
                   "saved (0: one split); with --group-col, stratified CV is reported too")
    d.add_argument("--map-correct", action="store_true", help="MAP format only: add the column "
                   "AnswerIsCorrect (yes/no: is MC_Answer the answer most chosen by True_ rows of "
                   "its question?) to the template")
    e = p.add_argument_group("embedding")
    e.add_argument("--model", default="Qwen/Qwen3-Embedding-0.6B",
                   help="Hub repo id or local checkpoint folder")
    e.add_argument("--instruction", default=None, help="Qwen3-Embedding instruction ('Instruct: "
                   "...\\nQuery:' prefix); None: the text alone")
    e.add_argument("--max-length", type=int, default=512, help="tokens per text, EOS included")
    e.add_argument("--no-eos", action="store_true", help="append no EOS token: pool the text's "
                   "own last token, as llama.cpp does for a plain Qwen3 LLM (the method's "
                   "published 0.944 was made so); default: EOS appended, as Qwen3-Embedding was "
                   "trained")
    e.add_argument("--dim", type=int, default=None,
                   help="keep the first DIM features (Matryoshka); None: all")
    e.add_argument("--pooling", choices=POOLINGS, default="last",
                   help="how token states become a vector: last (EOS) token or mean of tokens")
    e.add_argument("--layer", type=int, default=None, help="pool this layer's raw hidden state, 0 "
                   "= embeddings, negative from the end; None: the final normed output")
    e.add_argument("--layer-sweep", action="store_true",
                   help="one forward pass, a head per layer, a table of val MAP@3")
    e.add_argument("--compare-pooling", action="store_true",
                   help="the same for last and mean pooling")
    e.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="compute dtype; None: bfloat16 on CUDA GPUs of compute capability 8.0+ "
                   "and on CPUs with native bf16 (AVX-512 BF16, AMX), guarded float16 on 7.0-7.5 "
                   "(T4, V100), else float32. float16 is always guarded: matmuls in float16 on "
                   "inputs scaled into range, everything between them in float32")
    cli.add_flags(e)
    add_head_flags(p)
    return p.parse_args(argv)


def add_head_flags(p):
    h = p.add_argument_group("head and training")
    h.add_argument("--hidden", type=int, nargs=2, default=[1024, 512], metavar=("H1", "H2"),
                   help="hidden layer sizes")
    h.add_argument("--dropout", type=float, default=0.2,
                   help="on the input and after each hidden layer")
    h.add_argument("--activation", choices=sorted(ACTIVATIONS), default="gelu",
                   help="between the layers")
    h.add_argument("--input-norm", action="store_true", help="LayerNorm on the input vectors")
    h.add_argument("--epochs", type=int, default=30,
                   help="passes over the training rows; the best one is kept")
    h.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    h.add_argument("--warmup-frac", type=float, default=0.1,
                   help="share of steps spent warming up the LR")
    h.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW's decoupled weight decay")
    h.add_argument("--label-smoothing", type=float, default=0.0,
                   help="of the cross-entropy targets")
    h.add_argument("--head-batch-size", type=int, default=64, help="rows per optimizer step")
    h.add_argument("--seed", type=int, default=0, help="split, init and batch order")
    h.add_argument("--head-device", default=None,
                   help="where the head trains: cpu, cuda, ...; None: the embedding device")
    h.add_argument("--sweep", type=int, default=0,
                   help="try N random head configurations, rank them, save the best")
    h.add_argument("--out", default=None,
                   help="checkpoint folder to write; None: nothing is written")
    t = p.add_argument_group("fine-tuning the embedder with LoRA (lora.py)")
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


if __name__ == "__main__":
    cli.cli(main, parse_args)
