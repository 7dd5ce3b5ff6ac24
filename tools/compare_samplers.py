"""Random search against TPE with pruning, on the same cached vectors and wall-time budget: the
best validation MAP@3 each reaches by time, and what pruning saved. Reported, not a pass condition:
vectors of random weights are a weak test of a sampler.

    python tools/compare_samplers.py --data train.csv --model models/random-qwen3 --minutes 3

The vectors come through train.py's cache (embedded once); each study runs in memory with
train.py's search space and objective (research.suggest, research.fold_score), RandomSampler
standing for the hand-written random search this project had before Optuna.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's modules are one folder up

import research  # noqa: E402
import train  # noqa: E402


def run(args, x, task, optuna, sampler, prune, seconds):
    """One study for `seconds` -> [(seconds since start, state, value, epochs run, planned)]."""
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=(
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2) if prune
        else optuna.pruners.NopPruner()))
    t0, found = time.time(), []

    def record(study, trial):
        planned = trial.params.get("epochs", args.epochs)
        found.append((time.time() - t0, trial.state.name, trial.value,
                      (trial.last_step or 0) + 1 if trial.state.name == "PRUNED" else planned,
                      planned, trial.user_attrs.get("seconds", 0.0)))
    study.optimize(research.objective_of(args, x, task, optuna), timeout=seconds,
                   callbacks=[record], catch=(FloatingPointError,))
    return found


def best_by(trials, t):
    scores = [v for at, state, v, *_ in trials if at <= t and state == "COMPLETE"]
    return max(scores) if scores else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3, help="wall time of each study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    known, rest = p.parse_known_args(argv)
    args = train.parse_args(rest + ["--quiet"])  # train.py's flags: data, model, split, cache
    optuna = research.optuna_or_say()
    data = train.load_rows(args)
    task = train.split_rows(args, data)
    spec, options = train.check_flags(args)
    x = train.load_vectors(args, spec, options, train.answer_rows(args, data, task))[0]
    seconds = known.minutes * 60
    print(f"{len(task.tr)} train / {len(task.va)} val rows, {x.shape[1]}-d vectors; each study "
          f"{seconds:.0f} s")
    print("sampler        seed  trials  pruned  best@1/4  best@1/2  best@end  pruning saved")
    for name, prune in (("random", False), ("tpe+prune", True)):
        for seed in known.seeds:
            sampler = (optuna.samplers.RandomSampler(seed=seed) if name == "random"
                       else optuna.samplers.TPESampler(seed=seed))
            trials = run(args, x, task, optuna, sampler, prune, seconds)
            pruned = [t for t in trials if t[1] == "PRUNED"]
            # a pruned trial's full length, estimated from its time per epoch so far
            saved = sum(s / ran * (planned - ran) for _, _, _, ran, planned, s in pruned)
            print(f"{name:13s}  {seed:4d}  {len(trials):6d}  {len(pruned):6d}  "
                  + "  ".join(f"{best_by(trials, seconds * f):8.4f}" for f in (0.25, 0.5, 1))
                  + f"  {saved:.0f} s")


if __name__ == "__main__":
    main()
