"""train.py / evaluate.py / mlp_head.py / data.py: MAP@3, CSV quirks, the loop, end to end."""

import csv
import json
import math

import pytest
import torch

from at_scale import embed_cache
import evaluate
import fit
import train
from data import kfold, read_csv, render, split, template_fields
from helpers import count_forward_passes, write_csv
from mlp_head import MLPHead, load_checkpoint, map_at_k, predict_proba, top_k


# ----------------------------------------------------------------------------- MAP@3, worked by hand

def test_map_at_3_hand_worked():
    assert map_at_k(["a"], [["a", "b", "c"]]) == 1.0           # hit at rank 1
    assert map_at_k(["b"], [["a", "b", "c"]]) == 0.5           # rank 2
    assert map_at_k(["c"], [["a", "b", "c"]]) == pytest.approx(1 / 3)
    assert map_at_k(["d"], [["a", "b", "c"]]) == 0.0           # miss
    assert map_at_k(["d"], [["a", "b", "c", "d"]]) == 0.0      # a 4th guess does not count
    assert map_at_k(["b"], [["a", "b"]]) == 0.5                # fewer than 3 predictions
    assert map_at_k(["b"], [["a", "a", "b"]]) == pytest.approx(1 / 3)  # a repeat still uses up a rank
    assert map_at_k(["a"], [["a", "a", "a"]]) == 1.0           # counted once, not three times
    # the mean over rows: (1 + 1/2 + 0 + 1/3) / 4
    assert map_at_k(list("abcd"), [["a", "x", "y"], ["x", "b", "y"], ["x", "y", "z"], ["x", "y", "d"]]) == \
        pytest.approx((1 + 0.5 + 0 + 1 / 3) / 4)


def test_top_k_is_ordered_and_distinct():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]])
    assert top_k(probs, ["a", "b", "c", "d"])[0] == ["b", "d", "c"]
    assert len(set(top_k(probs, ["a", "b", "c", "d"])[1])) == 3
    assert top_k(probs[:, :2], ["a", "b"]) == [["b", "a"], ["a", "b"]]  # only 2 classes: 2 guesses


# ----------------------------------------------------------------------------- CSV and templates

def test_csv_quirks(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes('\ufeffrow_id,Text,Category,Misconception\n'
                     '1,"commas, ""quotes""\nand a newline",True_Correct,NA\n'
                     '2,plain,False_Misconception,Additive\n'.encode("utf-8"))
    columns, rows = read_csv(path)
    assert columns == ["row_id", "Text", "Category", "Misconception"]  # BOM not glued to the first name
    assert rows[0]["Text"] == 'commas, "quotes"\nand a newline'
    assert rows[0]["Misconception"] == "NA"  # the string, not a missing value
    assert render("{Category}:{Misconception} / {Text}", rows)[1] == "False_Misconception:Additive / plain"


@pytest.mark.parametrize("template", ["{Text.__class__}", "{Text[0]}", "{Text!r}", "{Text:>10}", "{}", "{0}"])
def test_templates_cannot_reach_attributes(template):
    with pytest.raises(ValueError, match="--text-template"):
        template_fields(template)


def test_splits():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    tr, va = split(labels, 0.2, seed=1)
    assert sorted(tr + va) == list(range(100)) and not set(tr) & set(va)
    assert [sum(labels[i] == y for i in va) for y in "abc"] == [10, 6, 4]  # stratified
    groups = [i % 7 for i in range(100)]
    tr, va = split(labels, 0.3, groups, seed=1)
    assert not {groups[i] for i in tr} & {groups[i] for i in va}
    folds = kfold(labels, 4, groups, seed=1)
    for g in set(groups):
        assert len({f for f, gg in zip(folds, groups) if gg == g}) == 1  # a group never straddles folds
    assert set(folds) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- the head and the loop

def head_args(**kw):
    args = train.parse_args([])
    args.epochs, args.hidden, args.quiet = 15, [64, 32], True
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def clusters(n_per_class=40, classes=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[y] + torch.randn(len(y), dim, generator=g), y


def test_lr_schedule():
    lrs = [fit.get_lr(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine only decays
    assert lrs[55] == pytest.approx(0.5, abs=1e-9) and lrs[-1] < 0.001


def test_head_learns_separated_clusters():
    x, y = clusters()
    labels = [f"c{i}" for i in range(5)]
    xv = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) * 0.5  # same centers, new noise
    head, best = fit.train_head(x, y, xv, y, labels, head_args())
    assert best.scores.map3 >= 0.95
    assert map_at_k([labels[i] for i in y], top_k(predict_proba([head], xv), labels)) == pytest.approx(best.scores.map3)


def test_same_seed_same_numbers_other_seed_other_numbers():
    x, y = clusters(classes=4, n_per_class=20)
    labels = list("abcd")
    runs = [fit.train_head(x[::2], y[::2], x[1::2], y[1::2], labels, head_args(epochs=3, seed=s))[1].scores
            for s in (3, 3, 4)]
    assert runs[0].loss == runs[1].loss and torch.equal(runs[0].probs, runs[1].probs)
    assert runs[0].loss != runs[2].loss


def test_fold_ensemble_averages_probabilities():
    torch.manual_seed(0)
    heads = [MLPHead(8, 3, (16, 8)).eval() for _ in range(3)]
    x = torch.randn(10, 8)
    expected = sum(h(x).softmax(-1) for h in heads) / 3
    assert torch.allclose(predict_proba(heads, x), expected, atol=1e-7)


# ----------------------------------------------------------------------------- end to end

def test_train_checkpoint_evaluate_submission(tmp_path, tiny, monkeypatch):
    data = write_csv(tmp_path / "train.csv")
    calls = count_forward_passes(monkeypatch)
    base = ["--data", str(data), "--model", str(tiny), "--cache-dir", str(tmp_path / "cache"),
            "--epochs", "3", "--hidden", "32", "16", "--quiet", "--group-col", "QuestionId"]
    first = train.main(train.parse_args(base + ["--out", str(tmp_path / "run")]), log=lambda *_: None)
    assert calls, "the first run must embed"
    calls.clear()
    logs = []
    second = train.main(train.parse_args(base + ["--out", str(tmp_path / "run2"), "--lr", "3e-3"]), log=logs.append)
    assert not calls and any("no forward pass" in line for line in logs)
    assert second["val_map3"] >= 0 and first["best_epoch"] >= 1

    heads, meta = load_checkpoint(tmp_path / "run")
    assert len(heads) == 1 and meta["embedding"]["model"] == str(tiny)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["epochs"] == 3
    # The saved validation predictions are the held-out rows of the grouped split, scored by the saved head.
    _, val = read_val_predictions(tmp_path / "run")
    rows = read_csv(data)[1]
    truth = [f"{r['Category']}:{r['Misconception']}" for r in rows]
    held_out = split(truth, 0.2, [r["QuestionId"] for r in rows], seed=0)[1]
    assert sorted(val, key=int) == [rows[i]["row_id"] for i in held_out]
    x = vectors_of(data, tiny, tmp_path / "cache")
    for i in held_out:
        assert torch.allclose(val[rows[i]["row_id"]], predict_proba(heads, x[i:i + 1])[0], atol=1e-5)

    test = write_csv(tmp_path / "test.csv", n=20, seed=1)
    out = evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "run"), "--data", str(test),
                                             "--out", str(tmp_path / "sub.csv"), "--cache-dir",
                                             str(tmp_path / "cache"), "--quiet"]))
    _, sub = read_csv(tmp_path / "sub.csv")
    assert list(sub[0]) == ["row_id", "Category:Misconception"]
    assert [r["row_id"] for r in sub] == [str(i) for i in range(20)]
    for r in sub:
        preds = r["Category:Misconception"].split(" ")
        assert len(preds) == 3 == len(set(preds)) and set(preds) <= set(meta["labels"])
    truth = [f"{r['Category']}:{r['Misconception']}" for r in read_csv(test)[1]]
    assert out["map3"] == pytest.approx(map_at_k(truth, [r["Category:Misconception"].split() for r in sub]))


def test_folds_save_k_heads_and_out_of_fold_score(tmp_path, tiny):
    data = write_csv(tmp_path / "train.csv")
    args = train.parse_args(["--data", str(data), "--model", str(tiny), "--cache-dir", str(tmp_path / "cache"),
                             "--epochs", "2", "--hidden", "16", "16", "--folds", "3", "--quiet",
                             "--out", str(tmp_path / "run")])
    res = train.main(args, log=lambda *_: None)
    assert len(res["fold_map3"]) == 3 and 0 <= res["oof_map3"] <= 1
    assert res["map3_mean"] == pytest.approx(sum(res["fold_map3"]) / 3)
    heads, meta = load_checkpoint(tmp_path / "run")
    assert len(heads) == 3 and meta["heads"] == ["head-0.safetensors", "head-1.safetensors", "head-2.safetensors"]
    assert math.isfinite(res["map3_std"])
    # Out of fold: each row's saved prediction comes from the one head that did not train on it.
    rows = read_csv(data)[1]
    fold = kfold([f"{r['Category']}:{r['Misconception']}" for r in rows], 3, None, seed=0)
    _, oof = read_val_predictions(tmp_path / "run")
    x = vectors_of(data, tiny, tmp_path / "cache")
    for i, row in enumerate(rows):
        probs = [predict_proba([h], x[i:i + 1])[0] for h in heads]
        assert torch.allclose(oof[row["row_id"]], probs[fold[i]], atol=1e-5)
        assert not any(torch.allclose(oof[row["row_id"]], p, atol=1e-4) for k, p in enumerate(probs) if k != fold[i])


def read_val_predictions(run):
    """val_predictions.csv -> (labels, {row id: probabilities})."""
    with open(run / "val_predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    labels = [k[2:] for k in table[0] if k.startswith("p_")]
    return labels, {r["row_id"]: torch.tensor([float(r[f"p_{label}"]) for label in labels]) for r in table}


def vectors_of(data, tiny, cache):
    """The default flags' vectors of a CSV's rows, from the cache the run wrote."""
    texts = render(train.MAP_TEMPLATE, read_csv(data)[1])
    return embed_cache.embed(texts, str(tiny), max_length=512, cache_dir=cache, progress=False,
                             log=lambda *_: None)[None]
