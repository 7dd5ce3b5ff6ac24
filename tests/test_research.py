"""Research flags: --layer-sweep, --compare-pooling, --sweep, fold ensembles, --map-correct, and the
history and tables each run keeps in --out."""

import csv
import json
import re

import pytest
import torch

from at_scale import embed_cache
import evaluate
import train
from data import add_answer_is_correct, map_correct_answers, read_csv, render
from mlp_head import load_checkpoint
from at_scale.embedder import Embedder
from qwen_embed import POOLINGS
from helpers import count_forward_passes, without, write_csv


@pytest.fixture()
def base(tmp_path, tiny):
    data = write_csv(tmp_path / "train.csv")
    return ["--data", str(data), "--model", str(tiny), "--cache-dir", str(tmp_path / "cache"), "--epochs", "2",
            "--hidden", "16", "8", "--quiet", "--device", "cpu", "--dtype", "float32"]  # exact comparisons below


def test_layer_sweep_one_row_per_layer_one_pass_for_all(base, tiny, monkeypatch):
    calls = count_forward_passes(monkeypatch)
    logs = []
    res = train.main(train.parse_args(base + ["--layer-sweep", "--compare-pooling", "--max-batch-tokens", "100000"]),
                     log=logs.append)
    n_layers = 3
    assert [(r[0], r[1]) for r in res["table"]] == \
        [(p, name) for p in POOLINGS for name in ["final (normed)"] + [str(i) for i in range(n_layers + 1)]]
    assert len(calls) == 1  # 48 texts in one batch: one forward pass, both poolings of every layer
    assert all(0 <= float(r[2]) <= 1 for r in res["table"])
    # The per-layer vectors are cached under their own keys: the plain run and a --layer run are free.
    calls.clear()
    train.main(train.parse_args(base), log=logs.append)
    train.main(train.parse_args(base + ["--layer", "-2", "--pooling", "mean"]), log=logs.append)
    assert not calls


def test_layer_vectors_are_the_raw_hidden_states(tmp_path, tiny):
    texts = ["a b c", "one third of the shape"]
    model = Embedder.from_pretrained(tiny, device="cpu", dtype="float32")
    expected = model.encode(texts, layers=[1], progress=False)[1]
    got = embed_cache.embed(texts, str(tiny), layers=(None, 1), cache_dir=tmp_path, progress=False,
                            log=lambda *_: None, device="cpu", dtype="float32")
    assert torch.allclose(got[1], expected, atol=1e-6)
    assert torch.allclose(got[None], model.encode(texts, progress=False), atol=1e-6)


def test_head_sweep_ranks_and_saves_the_best(tmp_path, base):
    base = without(base, "--epochs", "--hidden")
    res = train.main(train.parse_args(base + ["--sweep", "5", "--out", str(tmp_path / "best")]),
                     log=lambda *_: None)
    assert [t for t, _, _ in res["sweep"]] == list(range(5))
    best_trial, best_score = max(((t, m) for t, m, state in res["sweep"] if state == "complete"),
                                 key=lambda tm: (tm[1], -tm[0]))
    assert res["best_trial"] == best_trial and res["val_map3"] == best_score  # trained again: equal
    heads, meta = load_checkpoint(tmp_path / "best")
    row = next(r for r in read_rows(tmp_path / "best" / "sweep.csv") if int(r["trial"]) == best_trial)
    assert meta["head"]["hidden"] == [int(h) for h in row["hidden"].split("x")]
    assert meta["head"]["dropout"] == float(row["dropout"])
    assert json.loads((tmp_path / "best" / "args.json").read_text())["lr"] == float(row["lr"])
    other = f"sqlite:///{tmp_path / 'other.db'}"  # a fresh study, the same seed
    again = train.main(train.parse_args(base + ["--sweep", "5", "--sweep-storage", other]),
                       log=lambda *_: None)
    assert again["sweep"] == res["sweep"]  # fixed seed: the same trials, the same scores


def test_fold_ensemble_evaluate_averages_heads(tmp_path, base, capsys):
    res = train.main(train.parse_args(base + ["--folds", "3", "--group-col", "QuestionId", "--out",
                                              str(tmp_path / "cv")]), log=lambda *_: None)
    assert res["cv"] == "grouped by QuestionId" and res["stratified"]["cv"] == "stratified"
    out = evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "cv"), "--data", base[1],
                                             "--cache-dir", base[5], "--quiet", "--device", "cpu"]))
    heads, meta = load_checkpoint(tmp_path / "cv")
    x = embed_cache.embed(render(meta["embedding"]["text_template"], read_csv(base[1])[1]),
                          base[3], max_length=512, cache_dir=base[5], progress=False, log=lambda *_: None,
                          device="cpu", dtype="float32")[None]
    each = [h(x).softmax(-1) for h in heads]
    assert torch.allclose(out["probs"], sum(each) / 3, atol=1e-6)
    assert not torch.allclose(each[0], each[1])  # the heads differ, so the mean is a real ensemble


def test_map_correct_answers_hand_worked():
    rows = [
        {"QuestionId": "1", "MC_Answer": "A", "Category": "True_Correct"},
        {"QuestionId": "1", "MC_Answer": "A", "Category": "True_Neither"},
        {"QuestionId": "1", "MC_Answer": "B", "Category": "True_Misconception"},   # a mislabel: outvoted
        {"QuestionId": "1", "MC_Answer": "B", "Category": "False_Misconception"},
        {"QuestionId": "1", "MC_Answer": "C", "Category": "False_Neither"},
        {"QuestionId": "2", "MC_Answer": "X", "Category": "True_Correct"},
        {"QuestionId": "3", "MC_Answer": "Y", "Category": "False_Neither"},        # no True_ row
    ]
    correct = map_correct_answers(rows)
    assert correct == {"1": "A", "2": "X"}
    add_answer_is_correct(rows, correct)
    assert [r["AnswerIsCorrect"] for r in rows] == ["yes", "yes", "no", "no", "no", "yes", "no"]


def test_map_correct_flag_reaches_evaluation(tmp_path, base, monkeypatch):
    train.main(train.parse_args(base + ["--map-correct", "--out", str(tmp_path / "mc")]), log=lambda *_: None)
    _, meta = load_checkpoint(tmp_path / "mc")
    assert meta["embedding"]["text_template"].endswith("{AnswerIsCorrect}")
    assert meta["embedding"]["correct_answers"]
    test = write_csv(tmp_path / "test.csv", n=10, seed=3)
    out = evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "mc"), "--data", str(test),
                                             "--cache-dir", base[5], "--quiet", "--device", "cpu"]))
    assert len(out["predictions"]) == 10
    # Hand-made test rows: the answer training saw as correct for question 100, another answer to
    # it, and a question training never saw. No Category column: the test set has no labels.
    hand = tmp_path / "hand.csv"
    hand.write_text("row_id,QuestionId,QuestionText,MC_Answer,StudentExplanation\n"
                    "a,100,Q,\\( \\frac{1}{3} \\),because\nb,100,Q,7,because\nc,999,Q,\\( \\frac{1}{3} \\),because\n")
    embedded = []
    original = embed_cache.ensure_cached
    monkeypatch.setattr(embed_cache, "ensure_cached", lambda texts, *a, **k: embedded.extend(texts) or original(texts, *a, **k))
    evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "mc"), "--data", str(hand),
                                       "--cache-dir", base[5], "--quiet", "--device", "cpu"]))
    assert meta["embedding"]["correct_answers"]["100"] == r"\( \frac{1}{3} \)"
    assert [t.rsplit("? ", 1)[1] for t in embedded] == ["yes", "no", "no"]


# ----------------------------------------------------------------------------- what a run keeps

def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


EPOCH_LINE = re.compile(r"^(?:fold (\d+)  )?epoch +(\d+)/\d+  train loss ([\d.]+)  val loss ([\d.]+)  val acc ([\d.]+)  "
                        r"val MAP@3 ([\d.]+)  ")


def test_history_rows_are_the_epoch_log_lines(tmp_path, base):
    for flags in ([], ["--folds", "3"]):
        logs = []
        out = tmp_path / f"run{len(flags)}"
        train.main(train.parse_args(base + ["--epochs", "3", "--out", str(out)] + flags), log=logs.append)
        logged = [m.groups() for m in map(EPOCH_LINE.match, logs) if m]
        rows = read_rows(out / "history.csv")
        assert len(logged) == len(rows) == (3 if not flags else 9)
        for (fold, epoch, train_loss, val_loss, val_acc, val_map3), row in zip(logged, rows):
            assert (fold or "") == row.get("fold", "") and epoch == row["epoch"]
            for text, key in ((train_loss, "train_loss"), (val_loss, "val_loss"), (val_acc, "val_acc"),
                              (val_map3, "val_map3")):
                assert text == f"{float(row[key]):.4f}", key
            assert float(row["lr_head"]) > 0 and float(row["seconds"]) > 0
    folds = read_rows(tmp_path / "run2" / "folds.csv")
    res = json.loads((tmp_path / "run2" / "meta.json").read_text())
    assert [float(r["val_map3"]) for r in folds] == res["fold_map3"]


def test_sweep_and_layer_sweep_tables_round_trip(tmp_path, base):
    sweep_base = without(base, "--epochs", "--hidden")
    logs = []
    res = train.main(train.parse_args(sweep_base + ["--sweep", "3"]), log=logs.append)
    assert logs[-1] == train.NOT_SAVED  # said last, where a reader looks for what the run left
    res = train.main(train.parse_args(sweep_base + ["--sweep", "3", "--out", str(tmp_path / "sweep")]),
                     log=lambda *_: None)
    sweep = read_rows(tmp_path / "sweep" / "sweep.csv")
    assert [(int(r["trial"]), float(r["val_map3"]) if r["val_map3"] else None, r["state"])
            for r in sweep] == [tuple(t) for t in res["sweep"]]
    best = next(r for r in sweep if int(r["trial"]) == res["best_trial"])
    assert len(read_rows(tmp_path / "sweep" / "history.csv")) == int(best["epochs"])  # its epochs
    res = train.main(train.parse_args(base + ["--layer-sweep", "--out", str(tmp_path / "layers")]),
                     log=lambda *_: None)
    table = read_rows(tmp_path / "layers" / "layer_sweep.csv")
    assert [(r["pooling"], r["layer"], f"{float(r['val_map3']):.4f}", f"{float(r['val_acc']):.4f}", int(r["best_epoch"]))
            for r in table] == [(p, "final" if name == "final (normed)" else name, m, a, e)
                                for p, name, m, a, e, _ in res["table"]]
    assert json.loads((tmp_path / "layers" / "args.json").read_text())["layer_sweep"] is True


def test_no_eos_is_its_own_cache_entry_and_the_checkpoint_keeps_it(tmp_path, base, monkeypatch):
    train.main(train.parse_args(base + ["--out", str(tmp_path / "eos")]), log=lambda *_: None)
    train.main(train.parse_args(base + ["--no-eos", "--out", str(tmp_path / "no-eos")]), log=lambda *_: None)
    specs = [json.loads(f.read_text()) for f in (tmp_path / "cache").glob("*/spec.json")]
    assert len(specs) == 2 and sorted(s.get("eos", True) for s in specs) == [False, True]
    assert sum("eos" in s for s in specs) == 1  # with EOS the spec is as before --no-eos: old caches stay valid
    assert load_checkpoint(tmp_path / "no-eos")[1]["embedding"]["eos"] is False
    calls = count_forward_passes(monkeypatch)
    out = evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "no-eos"), "--data", base[1], "--device",
                                             "cpu", "--cache-dir", str(tmp_path / "cache"), "--quiet"]))
    assert not calls and out["map3"] > 0  # the checkpoint's no-EOS vectors, from the cache


def test_a_checkpoint_written_before_weights_and_eos_were_recorded_still_evaluates(tmp_path, base, monkeypatch):
    """meta.json's "embedding" is the EmbedSpec's fields plus the data's; one written before the
    weight format and EOS were recorded (both absent) reads as weights as shipped, EOS appended,
    and finds the vectors its head was trained on in the cache."""
    train.main(train.parse_args(base + ["--quantize", "none", "--out", str(tmp_path / "run")]), log=lambda *_: None)
    meta_file = tmp_path / "run" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert {"model", "instruction", "max_length", "pooling", "layer", "dim", "dtype", "weights",
            "eos"} <= set(meta["embedding"]) and meta["embedding"]["weights"] == "none"
    for field in ("weights", "eos"):
        del meta["embedding"][field]
    meta_file.write_text(json.dumps(meta))
    calls = count_forward_passes(monkeypatch)
    out = evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "run"), "--data", base[1], "--device",
                                             "cpu", "--cache-dir", str(tmp_path / "cache"), "--quiet"]))
    assert not calls and out["map3"] > 0
