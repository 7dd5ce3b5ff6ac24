"""The method's whole experiment: any embedder's vectors on the same head (--vectors, written by
tools/st_vectors.py or train.py --save-vectors), and the head searched by an Optuna study that
prunes, resumes after a kill and is shared by processes."""

import json
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch

import evaluate
import research
import train
from at_scale import embed_cache
from at_scale.embed_cache import read_vectors, write_vectors
from helpers import PINNED, ROOT, cli_error, count_forward_passes, write_csv
from mlp_head import load_checkpoint


@pytest.fixture()
def csvs(tmp_path):
    return write_csv(tmp_path / "train.csv", n=48), write_csv(tmp_path / "test.csv", n=12, seed=1)


def st_vectors(model, csv, out):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "st_vectors.py"), str(model),
                           str(csv), str(out), "--quiet", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


# ----------------------------------------------------------------------------- vectors from elsewhere

def test_a_head_on_sentence_transformers_vectors_trains_and_evaluates(tmp_path, tiny, csvs,
                                                                      monkeypatch, capsys):
    """tools/st_vectors.py with a small random sentence-transformers model (the tiny checkpoint's
    folder holds its modules.json and pooling), through train.py and evaluate.py: no forward pass
    of our own; the checkpoint records the embedder, evaluation refuses what it cannot check."""
    train_csv, test_csv = csvs
    train_vectors = st_vectors(tiny, train_csv, tmp_path / "train.safetensors")
    test_vectors = st_vectors(tiny, test_csv, tmp_path / "test.safetensors")
    st_vectors(tiny, test_csv, test_vectors)  # its own file: written again
    onto_csv = subprocess.run([sys.executable, str(ROOT / "tools" / "st_vectors.py"), str(tiny),
                               str(test_csv), str(train_csv)], capture_output=True, text=True)
    assert onto_csv.returncode == 1 and "is a file this program did not write" in onto_csv.stderr
    assert train.read_csv(train_csv)[1]  # the CSV it would have overwritten, intact
    calls = count_forward_passes(monkeypatch)
    base = ["--data", str(train_csv), "--vectors", str(train_vectors), "--epochs", "3", "--hidden",
            "16", "8", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    res = train.main(train.parse_args(base + ["--out", str(tmp_path / "run")]), log=lambda _: None)
    folds = train.main(train.parse_args(base + ["--folds", "3", "--label-smoothing", "0.1"]),
                       log=lambda _: None)
    assert 0 < res["val_map3"] <= 1 and len(folds["fold_map3"]) == 3 and not calls
    made = load_checkpoint(tmp_path / "run")[1]["embedding"]["vectors_from"]
    assert made["embedder"] == "sentence-transformers" and made["settings"]["model"] == str(tiny)
    assert made["settings"]["pooling"] == "lasttoken" and made["settings"]["model_identity"]
    ev = ["--checkpoint", str(tmp_path / "run"), "--data", str(test_csv), "--quiet"]
    out = evaluate.main(evaluate.parse_args(ev + ["--vectors", str(test_vectors)]))
    assert "MAP@3" in capsys.readouterr().out and len(out["predictions"]) == 12 and not calls
    assert "no model to embed with; give --vectors FILE" in cli_error(evaluate, ev)
    # vectors of another embedder (this project's own, here) are refused, naming both
    ours = tmp_path / "ours.safetensors"
    train.main(train.parse_args(["--data", str(test_csv), "--model", str(tiny), *PINNED, "--quiet",
                                 "--epochs", "1", "--cache-dir", str(tmp_path / "cache"),
                                 "--save-vectors", str(ours)]), log=lambda _: None)
    message = cli_error(evaluate, ev + ["--vectors", str(ours)])
    assert "embedder: 'qwen3-mlp' vs 'sentence-transformers'" in message


def test_every_vectors_refusal_is_one_line_before_any_work(tmp_path, tiny, csvs, monkeypatch):
    train_csv, _ = csvs
    ids = [row["row_id"] for row in train.read_csv(train_csv)[1]]
    record = {"embedder": "elsewhere", "settings": {"model": "m"}}
    good, short, nan, wide = (tmp_path / f"{n}.safetensors" for n in ("good", "short", "nan", "w"))
    write_vectors(good, ids + ["extra ids are fine"], torch.randn(len(ids) + 1, 8), record)
    write_vectors(short, ids[:-3], torch.randn(len(ids) - 3, 8), record)
    bad = torch.randn(len(ids), 8)
    bad[5, 2] = float("nan")
    write_vectors(nan, ids, bad, record)
    write_vectors(wide, ids, torch.randn(len(ids), 12), record)
    base = ["--data", str(train_csv), "--epochs", "1", "--hidden", "8", "8", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    calls = count_forward_passes(monkeypatch)
    train.main(train.parse_args(base + ["--vectors", str(good), "--out", str(tmp_path / "run")]),
               log=lambda _: None)
    for flags, said in [
            (["--vectors", str(short)], "lacks 3 of the 48 ids"),
            (["--vectors", str(nan)], "NaN or Inf in the vectors of ids ['5']"),
            (["--vectors", str(train_csv)], "not a safetensors file"),
            (["--vectors", str(good), "--lora-rank", "2"], "--lora-rank needs the model"),
            (["--vectors", str(good), "--layer-sweep"], "--layer-sweep needs the model"),
            (["--vectors", str(good), "--map-correct"], "--map-correct needs the model"),
            (["--vectors", str(good), "--model", str(tiny)], "--vectors has no model to use --model"),
            (["--vectors", str(good), "--pooling", "last"], "--vectors has no model to use --pooling")]:
        assert said in cli_error(train, base + flags), flags
    ev = ["--checkpoint", str(tmp_path / "run"), "--data", str(train_csv), "--quiet", "--vectors"]
    assert "12-d vectors, the head takes 8" in cli_error(evaluate, ev + [str(wide)])
    assert "has no model to use --dtype" in cli_error(evaluate, ev + [str(good), "--dtype",
                                                                      "float32"])
    assert not calls


def test_vectors_written_and_read_back_give_the_same_head_as_embedding(tmp_path, tiny, csvs):
    train_csv, _ = csvs
    base = ["--data", str(train_csv), "--epochs", "3", "--hidden", "16", "8", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    file = tmp_path / "ours.safetensors"
    direct = train.main(train.parse_args(base + ["--model", str(tiny), *PINNED, "--save-vectors",
                                                 str(file), "--out", str(tmp_path / "a")]),
                        log=lambda _: None)
    again = train.main(train.parse_args(base + ["--vectors", str(file), "--out",
                                                str(tmp_path / "b")]), log=lambda _: None)
    assert direct["val_map3"] == again["val_map3"] and direct["val_loss"] == again["val_loss"]
    a, b = (load_checkpoint(tmp_path / run)[0][0].state_dict() for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint that embedded scores the file's vectors: the same embedder and settings
    ev = ["--checkpoint", str(tmp_path / "a"), "--data", str(train_csv), "--quiet",
          "--cache-dir", str(tmp_path / "cache")]
    from_file = evaluate.main(evaluate.parse_args(ev + ["--vectors", str(file)]))
    assert torch.allclose(from_file["probs"], evaluate.main(evaluate.parse_args(ev))["probs"])
    x, made = read_vectors(file, [r["row_id"] for r in train.read_csv(train_csv)[1]])
    assert made["embedder"] == embed_cache.OURS and made["settings"]["model"] == str(tiny)


# ----------------------------------------------------------------------------- the study

@pytest.fixture()
def sweep(tmp_path, tiny, csvs):
    """train.py flags for a sweep on cached tiny vectors, epochs fixed at 4 (a given flag)."""
    base = ["--data", str(csvs[0]), "--model", str(tiny), *PINNED, "--quiet", "--cache-dir",
            str(tmp_path / "cache"), "--epochs", "4"]
    train.main(train.parse_args(base), log=lambda _: None)  # the vectors, cached
    return base


def study_of(res, tmp_path, storage=None):
    url = storage or f"sqlite:///{(tmp_path / 'cache' / 'sweeps.db').resolve()}"
    return optuna.load_study(study_name=res["study"], storage=url)


def test_a_sweep_is_a_study_that_resumes_and_keeps_its_table(tmp_path, sweep):
    said = []
    res = train.main(train.parse_args(sweep + ["--sweep", "6", "--hidden", "16", "8", "--out",
                                               str(tmp_path / "best")]), log=said.append)
    study = study_of(res, tmp_path)
    assert len(study.trials) == 6 and all("hidden" not in t.params for t in study.trials)
    assert all(t.params.keys() >= {"lr", "dropout", "activation"} for t in study.trials)
    meta = load_checkpoint(tmp_path / "best")[1]
    assert meta["head"]["hidden"] == [16, 8]  # given: fixed, not searched
    table = (tmp_path / "best" / "sweep.csv").read_text().splitlines()
    assert len(table) == 7 and table[0].startswith("trial,state,val_map3")
    assert (tmp_path / "best" / "importances.csv").is_file()
    said = []
    again = train.main(train.parse_args(sweep + ["--sweep", "6", "--hidden", "16", "8"]),
                       log=said.append)
    assert any("resuming study" in line and "(6 of 6 trials finished)" in line for line in said)
    assert not [line for line in said if line.startswith("trial ")]  # nothing trained again
    assert again["best_trial"] == res["best_trial"] and len(study_of(res, tmp_path).trials) == 6
    said = []
    changed = train.main(train.parse_args(sweep + ["--sweep", "2", "--seed", "1"]),
                         log=said.append)
    assert changed["study"] != res["study"] and any("a new study" in line for line in said)


def test_a_diverged_trial_fails_alone(tmp_path, sweep, monkeypatch):
    original, calls = research.train_head, []

    def second_diverges(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("epoch 3: the training loss became NaN or Inf")
        return original(*a, **k)
    monkeypatch.setattr(research, "train_head", second_diverges)
    res = train.main(train.parse_args(sweep + ["--sweep", "4"]), log=lambda _: None)
    states = [t.state.name for t in study_of(res, tmp_path).trials]
    assert states.count("FAIL") == 1 and len(states) == 4


def test_the_same_seed_proposes_the_same_trials_with_pruning(tmp_path, sweep):
    """More trials than TPE's 10 start-up trials, the pruner on: two fresh studies, same seed."""
    runs = []
    for name in ("a", "b"):
        storage = f"sqlite:///{tmp_path / name}.db"
        res = train.main(train.parse_args(sweep + ["--sweep", "13", "--hidden", "16", "8",
                                                   "--sweep-storage", storage]),
                         log=lambda _: None)
        study = study_of(res, tmp_path, storage)
        runs.append([(t.params, t.state.name, t.value) for t in study.trials])
    assert runs[0] == runs[1] and len(runs[0]) == 13


def test_a_sweep_with_folds_scores_the_mean_over_the_folds(tmp_path, sweep):
    res = train.main(train.parse_args(sweep + ["--sweep", "3", "--folds", "3", "--hidden", "16",
                                               "8", "--out", str(tmp_path / "cv")]),
                     log=lambda _: None)
    study = study_of(res, tmp_path)
    assert all(len(t.intermediate_values) == 3 for t in study.trials if t.state.name == "COMPLETE")
    assert len(load_checkpoint(tmp_path / "cv")[1]["heads"]) == 3


def test_without_optuna_or_with_a_bad_storage_a_sweep_is_one_line_before_work(sweep, monkeypatch):
    calls = count_forward_passes(monkeypatch)
    assert "--sweep-storage must be a database URL" in cli_error(
        train, sweep + ["--sweep", "2", "--sweep-storage", "studies.db", "--no-eos"])
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert cli_error(train, sweep + ["--sweep", "2", "--no-eos"]) == (
        "error: --sweep runs an Optuna study: pip install optuna")
    assert not calls  # --no-eos: vectors not cached yet, so a late check would have embedded


WITH_FAST_HEARTBEAT = ("import sys, research, train, cli; research.HEARTBEAT, "
                       "research.STALE_AFTER = 1, 2; cli.cli(train.main, train.parse_args, "
                       "sys.argv[1:])")


def test_a_sweep_killed_mid_trial_resumes_with_the_rest(tmp_path, sweep, monkeypatch):
    """SIGKILL while a trial runs: the rerun fails that trial as stale, retries its parameters once,
    trains only what is missing, and ends with N finished trials (the killed one not counted)."""
    argv = sweep + ["--sweep", "6", "--hidden", "16", "8", "--epochs", "30", "--head-batch-size",
                    "1"]  # a trial of seconds: long enough to be killed in
    proc = subprocess.Popen([sys.executable, "-c", WITH_FAST_HEARTBEAT, *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"sqlite:///{(tmp_path / 'cache' / 'sweeps.db').resolve()}"
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
        try:
            names = optuna.get_all_study_names(url)
            trials = optuna.load_study(study_name=names[0], storage=url).trials if names else []
        except Exception:  # the database is being created
            continue
        if sum(t.state.name == "COMPLETE" for t in trials) >= 2 and \
                trials[-1].state.name == "RUNNING" and trials[-1].intermediate_values:
            break  # mid-trial: its parameters drawn, some epochs reported
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    trials = optuna.load_study(study_name=names[0], storage=url).trials
    (killed,) = [t.number for t in trials if t.state.name == "RUNNING"]
    time.sleep(2.5)  # past STALE_AFTER: the killed trial's heartbeat is stale
    monkeypatch.setattr(research, "HEARTBEAT", 1)
    monkeypatch.setattr(research, "STALE_AFTER", 2)
    said = []
    res = train.main(train.parse_args(argv), log=said.append)
    study = study_of(res, tmp_path)
    assert study.trials[killed].state.name == "FAIL"
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].params == study.trials[killed].params
    assert len(research.finished(study)) == 6 and len(study.trials) == 7
    trained = [line for line in said if line.startswith("trial ")]
    assert len(trained) == 6 - len([t for t in trials if t.state.name == "COMPLETE"])


def test_two_processes_share_one_study(tmp_path, sweep):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    argv = sweep + ["--sweep", "8", "--hidden", "16", "8", "--sweep-storage", storage]
    procs = [subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    name = optuna.get_all_study_names(storage)[0]
    study = optuna.load_study(study_name=name, storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(set(numbers)) == len(numbers) and 8 <= len(numbers) <= 9  # one over, at most
    ran = [[line for line in out.splitlines() if line.startswith("trial ")] for out, _ in outs]
    assert all(ran) and sum(map(len, ran)) == len(numbers)


def test_every_head_option_has_a_range_in_the_search():
    research.check_space(research.SPACE)
    without = {k: v for k, v in research.SPACE.items() if k != "input_norm"}
    with pytest.raises(RuntimeError, match="no range for \\['input_norm'\\]"):
        research.check_space(without)
    trial = optuna.trial.FixedTrial({"hidden": "256x128", "dropout": 0.1, "activation": "relu",
                                     "input_norm": True, "label_smoothing": 0.0, "lr": 1e-3,
                                     "weight_decay": 0.0, "epochs": 10})
    args = train.parse_args(["--dropout", "0.3"])
    config = research.suggest(trial, args)
    assert config["dropout"] == 0.3 and config["hidden"] == [256, 128] and json.dumps(config)
