"""Draw what train.py runs learned, from their --out folders: learning curves, layer sweeps, sweeps.

    python tools/plot.py runs/map --out curves.png                  # val MAP@3 and losses per epoch
    python tools/plot.py runs/a runs/b --out compare.png            # several runs overlaid, named by folder
    python tools/plot.py runs/layers --out layers.svg               # --layer-sweep: val MAP@3 by layer
    python tools/plot.py runs/sweep --out sweep.pdf                 # --sweep: val MAP@3 by each hyperparameter
    python tools/plot.py runs/sweep --kind study --out study.png    # --sweep: score by trial, importances

Reads only the CSV and JSON files a run writes (history.csv, layer_sweep.csv, sweep.csv,
importances.csv, args.json), so a figure can be redrawn without the model or the vectors. The kind is chosen from
the files (--kind to force one); the format from --out's extension (png, svg, pdf). An existing
--out is replaced only if plot.py drew it (its metadata says so). Needs
matplotlib, a development requirement: the product never imports it.
"""

import argparse
import csv
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's data.py
from data import atomic_path, check_out  # noqa: E402

MARK = "tools/plot.py of qwen3-mlp"  # in every figure's metadata: a file plot.py may replace
KINDS = {"layers": "layer_sweep.csv", "sweep": "sweep.csv", "study": "importances.csv",
         "curves": "history.csv"}
SWEPT = [("lr", "peak learning rate", True), ("dropout", "dropout", False), ("weight_decay", "weight decay", False),
         ("label_smoothing", "label smoothing", False), ("epochs", "epochs", False), ("hidden", "hidden sizes", False)]


def read_run(folder):
    """{file name: rows (dicts of strings)} of the tables a run folder holds, and its args."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a run folder (train.py --out writes one)")
    tables = {}
    for name in KINDS.values():
        if (folder / name).is_file():
            with open(folder / name, newline="", encoding="utf-8") as f:
                tables[name] = list(csv.DictReader(f))
    if not tables:
        raise FileNotFoundError(f"{folder}: no history.csv, layer_sweep.csv or sweep.csv (written by train.py "
                                f"--out since runs keep their history)")
    args = json.loads((folder / "args.json").read_text()) if (folder / "args.json").is_file() else {}
    return {"name": folder.name, "tables": tables, "args": args}


def describe(args):
    """'model, data, split' for a title, from a run's args.json."""
    if not args:
        return ""
    split = (f"{args['folds']}-fold CV" if args.get("folds") else f"{args.get('val_frac', 0.2):g} held out") + (
        f", grouped by {args['group_col']}" if args.get("group_col") else ", stratified")
    return f"{Path(str(args.get('model', '?'))).name}, {Path(str(args.get('data', '?'))).name}, {split}"


def plot_curves(fig, runs):
    """Val MAP@3 and the losses per epoch; folds (or trials) as thin lines with their mean thick."""
    score, loss = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = f"C{i}"
        series = defaultdict(list)  # (fold or trial) -> rows
        for row in run["tables"]["history.csv"]:
            series[row.get("fold") or row.get("trial") or ""].append(row)
        thin = len(series) > 1
        for rows in series.values():
            epochs = [int(r["epoch"]) for r in rows]
            kw = dict(color=color, alpha=0.35, linewidth=0.8) if thin else dict(color=color, label=run["name"])
            score.plot(epochs, [float(r["val_map3"]) for r in rows], **kw)
            loss.plot(epochs, [float(r["train_loss"]) for r in rows], **kw)
            loss.plot(epochs, [float(r["val_loss"]) for r in rows], linestyle="--", **{**kw, "label": None})
        if thin:  # the mean over folds, by epoch
            by_epoch = defaultdict(list)
            for rows in series.values():
                for r in rows:
                    by_epoch[int(r["epoch"])].append(r)
            epochs = sorted(by_epoch)
            for axis, key, style in ((score, "val_map3", "-"), (loss, "train_loss", "-"), (loss, "val_loss", "--")):
                axis.plot(epochs, [statistics.mean(float(r[key]) for r in by_epoch[e]) for e in epochs], style,
                          color=color, linewidth=2, label=f"{run['name']} (mean of {len(series)})"
                          if key == "val_map3" or (axis is loss and key == "train_loss") else None)
    score.set(xlabel="epoch", ylabel="validation MAP@3", title="validation MAP@3")
    loss.set(xlabel="epoch", ylabel="cross-entropy (nats)", title="loss: training (solid), validation (dashed)")
    for axis in (score, loss):
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")


def plot_layers(fig, runs):
    """Val MAP@3 against the layer pooled, a line per (run, pooling); the final normed output marked."""
    axis = fig.subplots()
    for i, run in enumerate(runs):
        by_pooling = defaultdict(list)
        for row in run["tables"]["layer_sweep.csv"]:
            by_pooling[row["pooling"]].append(row)
        for j, (pooling, rows) in enumerate(sorted(by_pooling.items())):
            label = f"{run['name']}, {pooling} pooling" if len(runs) > 1 else f"{pooling} pooling"
            color, raw = f"C{i * 2 + j}", [r for r in rows if r["layer"] != "final"]
            axis.plot([int(r["layer"]) for r in raw], [float(r["val_map3"]) for r in raw], "o-", color=color,
                      markersize=3, label=label)
            final = [r for r in rows if r["layer"] == "final"]
            if final:  # after the final norm: drawn at the last layer, as a star
                axis.plot([int(raw[-1]["layer"]) if raw else 0], [float(final[0]["val_map3"])], "*", color=color,
                          markersize=12, label=f"{label}: final normed output")
    axis.set(xlabel="layer (0 = token embeddings)", ylabel="validation MAP@3", title="validation MAP@3 by layer")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")


def plot_sweep(fig, runs):
    """Val MAP@3 of every trial against each hyperparameter the sweep draws."""
    axes = fig.subplots(2, 3).flatten()
    for axis, (key, label, log_scale) in zip(axes, SWEPT):
        axis.set_xscale("log" if log_scale else "linear")  # first: setting a scale resets the ticks
        for i, run in enumerate(runs):
            rows = [r for r in run["tables"]["sweep.csv"] if complete(r) and r.get(key)]
            values = [r[key] for r in rows]  # finished trials (not pruned nor failed) that drew key
            if key == "hidden":  # categories, ordered by size
                order = sorted(set(values), key=lambda v: [int(n) for n in v.split("x")])
                x = [order.index(v) for v in values]
                axis.set_xticks(range(len(order)), order, fontsize="small")
            else:
                x = [float(v) for v in values]
            axis.scatter(x, [float(r["val_map3"]) for r in rows], s=18, color=f"C{i}", alpha=0.8, label=run["name"])
        axis.set(xlabel=label, ylabel="validation MAP@3")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")


def complete(row):
    """A sweep.csv row of a trial that ran to its end (sweeps of before studies: every row)."""
    return row.get("state", "complete") == "complete" and bool(row["val_map3"])


def plot_study(fig, runs):
    """A --sweep study: each trial's validation MAP@3 by trial number (pruned and failed ones marked
    at the bottom) with the best so far, and the parameters' importances."""
    by_trial, importance = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        rows = run["tables"]["sweep.csv"]
        scored = [(int(r["trial"]), float(r["val_map3"])) for r in rows if complete(r)]
        by_trial.scatter(*zip(*scored), s=18, color=f"C{i}", label=run["name"])
        best = [max(v for _, v in scored[:k + 1]) for k in range(len(scored))]
        by_trial.step([t for t, _ in scored], best, where="post", color=f"C{i}", alpha=0.6)
        low = min(v for _, v in scored)
        for state, marker in (("pruned", "x"), ("fail", "v")):
            trials = [int(r["trial"]) for r in rows if r["state"] == state]
            if trials:
                by_trial.scatter(trials, [low] * len(trials), marker=marker, color=f"C{i}",
                                 label=f"{run['name']}: {state}")
        found = run["tables"]["importances.csv"]
        names = [r["param"] for r in found]
        offset = (i - (len(runs) - 1) / 2) * 0.8 / len(runs)
        importance.barh([k + offset for k in range(len(names))],
                        [float(r["importance"]) for r in found], height=0.8 / len(runs),
                        color=f"C{i}")
        importance.set_yticks(range(len(names)), names, fontsize="small")
    by_trial.set(xlabel="trial", ylabel="validation MAP@3 (line: best so far)")
    importance.set(xlabel="importance (Optuna's evaluator)")
    by_trial.grid(alpha=0.3)
    by_trial.legend(fontsize="small")


def main(args):
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plot.py needs matplotlib: pip install matplotlib") from None
    runs = [read_run(folder) for folder in args.runs]
    kind = args.kind or next(k for k, file in KINDS.items() if all(file in r["tables"] for r in runs) or k == "curves")
    lacking = [r["name"] for r in runs if KINDS[kind] not in r["tables"]]
    if lacking:
        raise ValueError(f"--kind {kind} needs {KINDS[kind]}, which {', '.join(lacking)} lacks")
    if Path(args.out).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"--out {args.out}: the figure's format comes from its extension: .png, .svg or .pdf")
    check_out(args.out, kind="file", owned=lambda path: MARK.encode() in path.read_bytes())
    fig = plt.figure(figsize=(12, 7) if kind == "sweep" else (11, 4.5) if kind in ("curves", "study") else (8, 4.5),
                     layout="constrained")
    {"curves": plot_curves, "layers": plot_layers, "sweep": plot_sweep, "study": plot_study}[kind](
        fig, runs)
    described = sorted({describe(r["args"]) for r in runs} - {""})
    fig.suptitle(" | ".join(described) if len(described) == 1 else ", ".join(r["name"] for r in runs))
    suffix = Path(args.out).suffix.lower()[1:]
    with atomic_path(args.out) as tmp:  # marked as ours, so that redrawing it may replace it
        fig.savefig(tmp, format=suffix, dpi=args.dpi,
                    metadata={"Software" if suffix == "png" else "Creator": MARK})
    print(f"wrote {args.out} ({kind}: {', '.join(r['name'] for r in runs)})")
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="folders written by train.py --out")
    p.add_argument("--out", required=True, help="the figure: .png, .svg or .pdf")
    p.add_argument("--kind", choices=sorted(KINDS), default=None, help="what to draw; None: layers if every run "
                   "has layer_sweep.csv, else sweep if every run has sweep.csv, else learning curves; "
                   "study: a --sweep's score by trial and its parameters' importances")
    p.add_argument("--dpi", type=int, default=120, help="resolution of a PNG")
    return p.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")  # files only: no window, no display needed
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
