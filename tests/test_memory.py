"""Full-size research runs in bounded memory: one forward pass for every pooling and layer, vectors
streamed to disk in bounded chunks, one layer in memory at a time, evaluate.py reading its rows only."""

import gc
import weakref

import pytest
import torch

from safetensors.torch import load_file

from at_scale import embed_cache
import evaluate
import fit
import research
import train
from data import read_csv, render, split
from helpers import PINNED, cli_error, count_forward_passes, without, write_csv


@pytest.fixture()
def base(tmp_path, tiny):
    data = write_csv(tmp_path / "train.csv")
    return ["--data", str(data), "--model", str(tiny), "--cache-dir", str(tmp_path / "cache"), "--epochs", "2",
            "--hidden", "16", "8", "--quiet", *PINNED]


def track_loads(monkeypatch):
    """Every matrix the cache hands out, and how many earlier ones were still alive at each load."""
    alive_at_load, handed = [], []
    original = embed_cache.Cache.load

    def load(self, keys, dim):
        gc.collect()
        alive_at_load.append(sum(r() is not None for r in handed))
        out = original(self, keys, dim)
        handed.append(weakref.ref(out))
        return out

    monkeypatch.setattr(embed_cache.Cache, "load", load)
    return alive_at_load


def test_layer_sweep_one_pass_and_one_layer_in_memory_at_a_time(base, monkeypatch):
    calls = count_forward_passes(monkeypatch)
    alive = track_loads(monkeypatch)
    logs = []
    train.main(train.parse_args(base + ["--layer-sweep", "--compare-pooling", "--max-batch-tokens", "100000"]),
               log=logs.append)
    assert len(calls) == 1  # 48 texts in one batch: ONE forward pass for both poolings and all 5 layers
    assert len(alive) == 2 * 5 and max(alive) <= 1  # never more than two layers' vectors alive
    size = next(line for line in logs if line.startswith("cache: "))
    assert size.startswith("cache: 48 texts x 10 (pooling, layer) x 64 x 4 B = 0.1 MB on disk")  # 48 x 10 x (256 + 32) B
    assert logs.index(size) < next(i for i, line in enumerate(logs) if line.startswith("embeddings: 10 x (48, 64)"))


def test_pending_vectors_are_bounded_while_embedding(tmp_path, tiny, monkeypatch):
    """With 10 (pooling, layer) specs of 64 floats and a bound of 3 texts' vectors, batches of one
    text are written 3 at a time (the first batch at once), not held until the end."""
    monkeypatch.setattr(embed_cache, "PENDING_BYTES", 10 * 64 * 4 * 3)  # 3 texts of every spec
    monkeypatch.setattr(embed_cache, "COMPACT_AT", 10**6)
    texts = [f"text {i} " + "word " * i for i in range(20)]
    stored = embed_cache.ensure_cached(
        texts, embed_cache.EmbedSpec(str(tiny), dtype="float32"),
        embed_cache.RunOptions(device="cpu", batch_size=1, cache_dir=tmp_path, progress=False),
        poolings=("last", "mean"), layers=(None, 0, 1, 2, 3), log=lambda *_: None)
    sizes = [len(load_file(f)["keys"]) for f in tmp_path.glob("*/chunk-*.safetensors")]
    assert len(sizes) == 10 * 8 and max(sizes) == 3  # per spec: 1, then 6 x 3, then the last 1
    one = embed_cache.embed(texts, str(tiny), pooling="mean", layers=(2,), cache_dir=tmp_path / "fresh",
                            progress=False, log=lambda *_: None, device="cpu", dtype="float32")[2]
    assert torch.allclose(stored["mean", 2].load(), one, atol=1e-6)


def test_each_sweep_row_is_a_head_trained_on_that_layer_alone(base, tiny):
    args = train.parse_args(base + ["--layer-sweep", "--compare-pooling"])
    res = train.main(args, log=lambda *_: None)
    rows = read_csv(args.data)[1]
    texts = render(args.text_template, rows)
    truth = [f"{r['Category']}:{r['Misconception']}" for r in rows]
    labels = sorted(set(truth))
    y = torch.tensor([labels.index(t) for t in truth])
    tr, va = (torch.tensor(i) for i in split(truth, args.val_frac, None, args.seed))
    table = {(r[0], r[1]): r[2] for r in res["table"]}
    scores = set()
    for pooling, layer in (("last", 0), ("last", 2), ("mean", 3), ("last", None)):
        x = embed_cache.embed(texts, str(tiny), pooling=pooling, layers=(layer,), cache_dir=args.cache_dir,
                              max_length=512, progress=False, log=lambda *_: None, device="cpu", dtype="float32")[layer]
        _, best = fit.train_head(x[tr], y[tr], x[va], y[va], labels, args)
        assert f"{best.scores.map3:.4f}" == table[pooling, "final (normed)" if layer is None else str(layer)]
        scores.add(best.scores.map3)
    assert len(scores) > 1  # the rows differ, so a row computed on the wrong layer would show


def test_sweep_table_has_a_bar_per_row_from_lowest_to_highest(base):
    logs = []
    train.main(train.parse_args(base + ["--layer-sweep"]), log=logs.append)
    header = next(i for i, line in enumerate(logs) if "val MAP@3" in line and "pooling" in line)
    rows = logs[header + 1:header + 6]
    scores = [float(line.split()[2 if "final" not in line else 3]) for line in rows]
    bars = [line.count("#") for line in rows]
    assert bars[scores.index(max(scores))] == 24 and bars[scores.index(min(scores))] == 0
    assert all((a < b) == (sa < sb) for a, sa in zip(bars, scores) for b, sb in zip(bars, scores) if abs(sa - sb) > 0.05)


def test_head_sweep_keeps_only_the_best_trial(base, monkeypatch):
    heads, alive = [], []
    original = research.train_head  # the sweep's trials go through research.py

    def tracked(*a, **k):
        gc.collect()
        alive.append(sum(h() is not None for h in heads))
        head, best = original(*a, **k)
        heads.append(weakref.ref(head))
        return head, best

    monkeypatch.setattr(research, "train_head", tracked)
    train.main(train.parse_args(without(base, "--epochs", "--hidden") + ["--sweep", "6"]),
               log=lambda *_: None)
    assert len(alive) == 6 + 1 and max(alive) <= 1  # 6 trials, the best trained again: one head


def test_evaluate_reads_only_the_rows_it_scores(tmp_path, base, monkeypatch):
    train.main(train.parse_args(base + ["--out", str(tmp_path / "run")]), log=lambda *_: None)  # 48 rows cached
    rows = read_csv(base[1])[1][:5]
    subset = tmp_path / "five.csv"
    with open(subset, "w", newline="", encoding="utf-8") as f:
        import csv
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    read = []
    original = embed_cache.Cache.read_rows
    monkeypatch.setattr(embed_cache.Cache, "read_rows",
                        lambda self, file, hits, out, **k: read.append(len(hits)) or original(self, file, hits, out, **k))
    out = evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "run"), "--data", str(subset),
                                             "--cache-dir", base[5], "--quiet", "--device", "cpu"]))
    assert sum(read) == 5 and len(out["predictions"]) == 5


def test_a_disk_too_small_for_the_vectors_is_one_line_before_any_work(base, tmp_path, monkeypatch):
    calls = count_forward_passes(monkeypatch)
    monkeypatch.setattr(embed_cache.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    message = cli_error(train, base + ["--layer-sweep"])
    assert "--cache-dir" in message and "the vectors need" in message and "48 texts x 5 (pooling, layer) x 64 x 4 B" \
        in message and "1000" not in message
    assert not calls and not list((tmp_path / "cache").glob("*/"))  # no vector folder
