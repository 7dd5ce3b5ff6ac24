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
import hashlib
import inspect
import json
import math
import re
import time
import warnings
from pathlib import Path

import torch

import train
from at_scale import embed_cache, fingerprint
from at_scale.embed_cache import Measured
from at_scale.embedder import Embedder
from at_scale.lora import add_lora, check_lora, checkpoint_blocks
from at_scale.runtime import dtype_name, pick_device
from at_scale.weights import checkpoint_tensors
from cli import check_ranges, log, refuse_given
from data import kfold, write_tables
import fit
from fit import interrupted, make_head, score_head, train_head, train_loop
from mlp_head import ACTIVATIONS, head_loss, head_options
from qwen_embed import POOLINGS, Qwen3Config


def run(args, spec, options, data, task, results):
    """The mode the flags ask for -> the results (with --out: its tables, or its checkpoint)."""
    if args.layer_sweep or args.compare_pooling:
        return layer_sweep(args, spec, options, data, task, results)
    if args.lora_rank:  # fine-tuning: no cached vectors, they change as the adapters learn
        with interrupted(lambda: "while fine-tuning"):
            fitted, spec, fidelity, folder = train_lora(args, spec, data.texts, task)
        identity = fingerprint.model_identity(folder, args.cache_dir, log)
        return train.finish(args, data, task, fitted, results, spec, Measured(identity, fidelity))
    found = train.load_vectors(args, spec, options, data)
    if found is None:  # a torchrun rank other than 0
        return None
    x, spec, measured = found
    return train.finish(args, data, task, fit_sweep(args, x, task), results, spec, measured)


def check_flags(args):
    """The research flags checked before any work (a Hub model's layer count once it is read)."""
    check_ranges([
        ("--sweep", args.sweep, args.sweep >= 0, "0 (no sweep) or a number of trials"),
        ("--lora-alpha", args.lora_alpha, args.lora_alpha > 0, "positive"),
        ("--lora-lr", args.lora_lr, args.lora_lr > 0, "positive"),
        ("--lora-layers", args.lora_layers, args.lora_layers is None or args.lora_layers >= 1,
         "between 1 and the model's layers"),
    ])
    if args.sweep:  # Optuna and the storage's URL before any embedding, not after it
        optuna_or_say()
        if args.sweep_storage and not re.match(r"^[a-z][\w+]*://", args.sweep_storage):
            raise ValueError(f"--sweep-storage must be a database URL (sqlite:///sweeps.db, "
                             f"postgresql://user@host/db), got {args.sweep_storage!r}")
    if (args.layer_sweep or args.compare_pooling) and args.folds:
        raise ValueError("--layer-sweep and --compare-pooling use one split: drop --folds")
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
LORA_IGNORES = ("compile", "cache_chunk", "cache_seconds", "batch_size", "max_batch_tokens",
                "save_vectors")
LORA_ONLY = set()  # the LoRA group's flags but --lora-rank, filled by add_flags from the parser


def ignored(args):
    """(mode, the flags' dests it ignores or sets itself, which of the two) for the modes asked
    for: a flag given for them would be dropped without a word."""
    found = [("--folds", {"val_frac"}, "ignores")] if args.folds else []
    if args.layer_sweep or args.compare_pooling:  # a table of vectors, not one set to write
        found.append(("--layer-sweep" if args.layer_sweep else "--compare-pooling",
                      {"save_vectors"}, "ignores"))
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
    r.add_argument("--sweep", type=int, default=0, help="an Optuna study of N head configurations "
                   "(TPE, pruned; a head flag given fixes that option); rerun to resume; the best "
                   "is saved")
    r.add_argument("--sweep-storage", default=None, help="a database URL that several processes "
                   "or machines share the study through (sqlite:///x.db, postgresql://...); None: "
                   "an SQLite file in --cache-dir")
    r.add_argument("--sweep-sampler", choices=["tpe", "random"], default="tpe",
                   help="how the study proposes configurations")
    r.add_argument("--no-sweep-prune", action="store_true",
                   help="run every trial to its last epoch")
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


# ----------------------------------------------------------------------------- the head search

# A study's trials write their heartbeat to the storage this often (seconds); one silent for
# STALE_AFTER is a killed process's, failed and retried once with the same parameters.
HEARTBEAT, STALE_AFTER = 10, 30


# The search space of --sweep, each option's range: every option of MLPHead and head_loss (a new one
# without a range is refused by check_space), and the training flags lr, weight decay and epochs.
SPACE = {
    "hidden": lambda trial: [int(h) for h in trial.suggest_categorical(
        "hidden", ["256x128", "512x256", "1024x512", "2048x1024"]).split("x")],
    "dropout": lambda trial: trial.suggest_categorical("dropout", [0.0, 0.1, 0.2, 0.3, 0.5]),
    "activation": lambda trial: trial.suggest_categorical("activation", sorted(ACTIVATIONS)),
    "input_norm": lambda trial: trial.suggest_categorical("input_norm", [False, True]),
    "label_smoothing": lambda trial: trial.suggest_categorical("label_smoothing",
                                                               [0.0, 0.05, 0.1]),
    "lr": lambda trial: trial.suggest_float("lr", 1e-4, 10 ** -2.5, log=True),
    "weight_decay": lambda trial: trial.suggest_categorical("weight_decay",
                                                            [0.0, 1e-4, 1e-2, 0.1]),
    "epochs": lambda trial: trial.suggest_categorical("epochs", [10, 20, 30, 50]),
}


def suggest(trial, args, space=SPACE):
    """One head configuration: each option of the space drawn from its range, unless the command
    line gave its flag (args.given), which fixes it."""
    check_space(space)
    given = getattr(args, "given", {})
    return {name: getattr(args, name) if name in given else draw(trial)
            for name, draw in space.items()}


def check_space(space):
    """Every head option and loss option has a range: the options are read from MLPHead's and
    head_loss's signatures, so a new one cannot be silently left out of the search."""
    options = {name for name in head_options() if name not in ("in_dim", "n_classes")}
    options |= {p.name for p in inspect.signature(head_loss).parameters.values()
                if p.default is not p.empty}
    missing = sorted(options - space.keys())
    if missing:
        raise RuntimeError(f"research.SPACE has no range for {missing}")


def optuna_or_say():
    try:
        import optuna
    except ImportError:
        raise ValueError("--sweep runs an Optuna study: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial instead
    # the heartbeat and its retry are marked experimental; a run's output is its own lines
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def study_name(args, x, task):
    """What a study's trials are comparable under: the vectors, the labels and the split, the
    head and training flags (the seed among them) and which of them are fixed, the search space
    (SPACE's code), the sampler and the pruner. Any change: another study."""
    fixed = sorted(set(getattr(args, "given", {})) & SPACE.keys())
    flags = {d: getattr(args, d) for d in sorted(train.HEAD_FLAGS - {"out", "head_device"})}
    h = hashlib.sha256()
    for part in (x.numpy().tobytes(), task.y.numpy().tobytes(), task.tr.numpy().tobytes(),
                 json.dumps([args.folds, args.group_col, flags, fixed, args.sweep_sampler,
                             args.no_sweep_prune]).encode(),
                 "".join(inspect.getsource(draw) for draw in SPACE.values()).encode()):
        h.update(part)
    return f"sweep-{h.hexdigest()[:16]}"


def open_study(args, x, task, optuna):
    """The study of this command: found where the last run left it (resumed: its finished trials
    kept, a killed trial retried once with the same parameters) or created. The storage:
    --sweep-storage, or an SQLite file in --cache-dir (the cache's folder, never --out, which a
    run replaces whole)."""
    url = args.sweep_storage or f"sqlite:///{Path(args.cache_dir).resolve() / 'sweeps.db'}"
    if not args.sweep_storage:
        Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    retry = {"heartbeat_stale_trial_callback": "RetryHeartbeatStaleTrialCallback",  # Optuna 4.9+
             "failed_trial_callback": "RetryFailedTrialCallback"}  # before: the same, named so
    argument = next(a for a in retry
                    if a in inspect.signature(optuna.storages.RDBStorage).parameters)
    # SQLite: wait for another process's lock instead of failing at once (two starting together)
    wait = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    name = study_name(args, x, task)
    sampler = (optuna.samplers.RandomSampler(seed=args.seed) if args.sweep_sampler == "random"
               else optuna.samplers.TPESampler(seed=args.seed))
    pruner = (optuna.pruners.NopPruner() if args.no_sweep_prune else
              optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2))
    for attempt in range(5):  # processes starting at once race to create the tables and study
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=wait, heartbeat_interval=HEARTBEAT, grace_period=STALE_AFTER,
                **{argument: getattr(optuna.storages, retry[argument])(max_retry=1)})
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                        pruner=pruner, direction="maximize", load_if_exists=True)
            break
        except Exception as e:  # sqlalchemy's OperationalError or IntegrityError of the race
            if attempt == 4 or type(e).__name__ not in ("OperationalError", "IntegrityError"):
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"--sweep-storage {url}: cannot open the study ({why})") from None
            time.sleep(0.5 * (attempt + 1))
    optuna.storages.fail_stale_trials(study)  # a killed run's trial: failed, then retried
    done = len(finished(study))
    log(f"sweep: {'resuming' if study.trials else 'a new'} study {name} in {url} ({done} of "
        f"{args.sweep} trials finished)")
    return study


def finished(study):
    """The trials that count towards --sweep N: complete, pruned or failed, but not one that was
    stopped (Ctrl-C) or killed and is retried."""
    trials = study.get_trials(deepcopy=False)
    retried = ({t.system_attrs.get("failed_trial") for t in trials}  # killed: Optuna retries it
               | {t.user_attrs.get("retry_of") for t in trials})  # stopped: we enqueued it again
    return [t for t in trials
            if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t.number not in retried]


def fit_sweep(args, x, task):
    """--sweep N: an Optuna study of head configurations on the same vectors and split (TPE, seeded;
    a trial pruned once its validation MAP@3 lags the median of earlier trials at the same epoch;
    with --folds the mean over the folds). Trials run until the study holds N finished ones, so a
    rerun resumes, and processes sharing --sweep-storage share the N. The best configuration is
    trained again to give the head kept (the K heads with --folds)."""
    optuna = optuna_or_say()
    study = open_study(args, x, task, optuna)
    current = {}
    objective = objective_of(args, x, task, optuna, current)

    def progress():
        return f"after {len(finished(study))} of {args.sweep} sweep trials"

    with interrupted(progress):
        try:
            while len(finished(study)) + running(study) < args.sweep:
                study.optimize(objective, n_trials=1, catch=(FloatingPointError,))
                say_trial(study.trials[current["trial"].number])
        except KeyboardInterrupt:  # the stopped trial (failed by Optuna) is run again by the rerun
            if "trial" in current and current["trial"].number not in {
                    t.number for t in finished(study) if t.state.name != "FAIL"}:
                study.enqueue_trial(current["trial"].params,
                                    user_attrs={"retry_of": current["trial"].number})
            raise
    return best_of(study, args, x, task, optuna)


def objective_of(args, x, task, optuna, current=None):
    """The study's objective: a trial's configuration (suggest) trained and scored (fold_score),
    each epoch's (or fold's) score reported to the pruner; current["trial"]: the trial running."""
    def objective(trial):
        if current is not None:
            current["trial"] = trial
        config = suggest(trial, args)
        trial_args = argparse.Namespace(**{**vars(args), **config})
        t0 = time.time()

        def prune(step, score):
            trial.report(score, step)
            if trial.should_prune():
                trial.set_user_attr("seconds", time.time() - t0)
                raise optuna.TrialPruned()

        score = fold_score(trial_args, x, task, prune)
        trial.set_user_attr("seconds", time.time() - t0)
        return score
    return objective


def running(study):
    return sum(t.state.name == "RUNNING" for t in study.get_trials(deepcopy=False))


def fold_score(args, x, task, report):
    """The validation MAP@3 of a head configuration: of the split, or the mean over --folds K
    (reported after each fold, so that a losing configuration is pruned before its last fold);
    report(step, score) after each epoch of one split."""
    if not args.folds:
        _, best = train_head(x[task.tr], task.y[task.tr], x[task.va], task.y[task.va], task.labels,
                             args, on_epoch=lambda epoch, val: report(epoch, val.map3))
        return best.scores.map3
    fold, scores = torch.tensor(kfold(task.truth, args.folds, task.groups, args.seed)), []
    n = len(task.y)
    for k in range(args.folds):
        tr, va = (fold != k).nonzero().flatten(), (fold == k).nonzero().flatten()
        xk = x if len(x) == n else x[k * n:(k + 1) * n]  # --map-correct: the fold's own texts
        _, best = train_head(xk[tr], task.y[tr], xk[va], task.y[va], task.labels, args)
        scores.append(best.scores.map3)
        report(k, sum(scores) / len(scores))
    return sum(scores) / len(scores)


def say_trial(t):
    what = {"COMPLETE": f"val MAP@3 {t.value:.4f}" if t.value is not None else "",
            "PRUNED": f"pruned at step {t.last_step}", "FAIL": "failed (NaN or Inf)"}
    log(f"trial {t.number:3d}: {what.get(t.state.name, t.state.name.lower())}  "
        f"{json.dumps(t.params)}  {t.user_attrs.get('seconds', 0):.1f}s")


def best_of(study, args, x, task, optuna):
    """The study's table (every trial, pruned and failed ones marked), its parameter importances,
    and the best configuration trained again: the head (or K heads) the run keeps."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name != "RUNNING"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if not complete:
        raise FloatingPointError(f"no sweep trial finished with a score ({len(trials)} pruned or "
                                 f"failed)")
    best = max(complete, key=lambda t: (t.value, -t.number))
    table = [{"trial": t.number, "state": t.state.name.lower(), "val_map3": t.value,
              "last_step": t.last_step, "seconds": t.user_attrs.get("seconds"), **t.params}
             for t in sorted(trials, key=lambda t: t.number)]
    importances = {}
    if len(complete) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as e:  # e.g. a single distinct configuration
            log(f"sweep: no parameter importances ({e})")
    if importances:
        log("sweep: parameter importances (Optuna's default evaluator): " + ", ".join(
            f"{name} {value:.2f}" for name, value in importances.items()))
    log(f"sweep: best trial {best.number}, val MAP@3 {best.value:.4f}, {json.dumps(best.params)}; "
        f"{sum(t.state.name == 'PRUNED' for t in trials)} of {len(trials)} trials pruned")
    config = {**suggest(optuna.trial.FixedTrial(best.params), args)}
    winner = argparse.Namespace(**{**vars(args), **config})
    if args.folds:
        heads, probs, res, tables = fit.cross_validate(winner, x, task, quiet=True)
        val_idx = torch.arange(len(task.y))
    else:
        head, found = train_head(x[task.tr], task.y[task.tr], x[task.va], task.y[task.va],
                                 task.labels, winner)
        heads, probs, val_idx = [head], found.scores.probs, task.va
        res, tables = fit.best_results(found), {"history.csv": found.history}
    results = {**res, "best_trial": best.number, "study": study.study_name,
               "sweep": [[t["trial"], t["val_map3"], t["state"]] for t in table],
               "importances": importances}
    tables = {**tables, "sweep.csv": table,
              "importances.csv": [{"param": k, "importance": v} for k, v in importances.items()]}
    return fit.Fitted(heads, val_idx, probs, results, tables, config)


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
    else:
        log(train.NOT_SAVED)
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


