"""Bad input, interruptions, corrupt caches, NaN, no pickle, and property-based tests."""

import ast
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from at_scale import embed_cache
import evaluate
import train
from data import read_csv, render
from helpers import PINNED, PINNED_KW, ROOT, cached_keys, cli_error, count_forward_passes, embedded, write_csv

@pytest.fixture()
def run(tmp_path, tiny):
    """Train args on a good CSV and the tiny checkpoint, writing nothing outside tmp_path."""
    data = write_csv(tmp_path / "train.csv")
    return ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--hidden", "8", "8", "--quiet", "--out", str(tmp_path / "out")]


def replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.mark.parametrize("content, message", [
    (None, "no such CSV file"),
    (b"", "empty file"),
    (b"row_id,QuestionText,Category,Misconception\n", "no data rows"),
    ("row_id,Text\n1,caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    (b"row_id,StudentExplanation,Category,Misconception\n1,a,b\n", "line 2: 3 fields, the header has 4"),
])
def test_bad_csv_files(tmp_path, run, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_bytes(content)
    assert message in cli_error(train, replace(run, "--data", str(path)))
    assert str(path) in cli_error(train, replace(run, "--data", str(path)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--label-cols", "Category,Nope", r"--label-cols names column\(s\) \['Nope'\] that the CSV lacks; it has \['row_id'"),
    ("--id-col", "id", r"--id-col names column\(s\) \['id'\]"),
    ("--group-col", "Question", r"--group-col names column\(s\) \['Question'\]"),
    ("--text-template", "{QuestionText} {Missing}", r"--text-template names column\(s\) \['Missing'\]"),
    ("--text-template", "{QuestionText.__class__}", "must be a plain column name"),
    ("--dim", "0", "--dim must be positive"),
    ("--dim", "65", "--dim must be between 1 and the model's hidden size 64"),
    ("--max-length", "1", "--max-length must be at least 2"),
    ("--device", "tpu", "unknown device 'tpu'"),
    ("--max-memory", "0", "--max-memory must be positive, got 0"),
    ("--folds", "1", "--folds must be 0"),
    ("--cache-chunk", "0", "--cache-chunk must be positive, got 0"),
    ("--max-batch-tokens", "0", "--max-batch-tokens must be positive, got 0"),
    ("--head-device", "tpu", "unknown device 'tpu'"),
    ("--layer", "9", "--layer must be between -4 and 3 for this 3-layer model"),
])
def test_bad_flags(tmp_path, run, flag, value, message):
    argv = replace(run, flag, value) if flag in run else run + [flag, value]
    assert re.search(message, cli_error(train, argv))
    assert not (tmp_path / "out").exists()


def test_duplicate_ids_and_empty_texts(tmp_path, run):
    data = tmp_path / "dupes.csv"
    data.write_text("row_id,QuestionText,MC_Answer,StudentExplanation,Category,Misconception\n"
                    "1,q,a,e,True_Correct,NA\n2,q,a,e,True_Correct,NA\n1,q,a,e,True_Correct,NA\n")
    assert "duplicate row_id values ['1']" in cli_error(train, replace(run, "--data", str(data)))
    # Empty texts are embedded (EOS alone still gives a finite vector), with a warning naming the rows.
    data.write_text("row_id,StudentExplanation,Category,Misconception\n" +
                    "".join(f"{i},{'' if i < 2 else 'text ' * i},C{i % 2},NA\n" for i in range(8)))
    logs = []
    argv = replace(run, "--data", str(data)) + ["--text-template", "{StudentExplanation}"]
    train.main(train.parse_args(argv), log=logs.append)
    assert any("2 rows render to an empty text" in line and "['0', '1']" in line for line in logs)


def test_broken_checkpoints(tmp_path, run, tiny):
    model = shutil.copytree(tiny, tmp_path / "model")
    argv = replace(run, "--model", str(model))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    assert "model_type is 'llama', only 'qwen3' is supported" in cli_error(train, argv)
    (model / "config.json").write_text(json.dumps(cfg))
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:1000])
    assert "model.safetensors: not a readable safetensors file" in cli_error(train, argv)
    (model / "tokenizer.json").unlink()
    assert "tokenizer.json: missing from the model directory" in cli_error(train, argv)
    assert "not a model directory" in cli_error(train, replace(run, "--model", str(tmp_path / "absent")))
    assert not (tmp_path / "out").exists()


def test_broken_head_checkpoint_and_unseen_labels(tmp_path, run, capsys):
    train.main(train.parse_args(run), log=lambda *_: None)
    test = tmp_path / "test.csv"
    rows = read_csv(write_csv(tmp_path / "t.csv", n=8))[1]
    rows[0]["Misconception"] = "Never_seen"
    with open(test, "w", newline="") as f:
        import csv
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    argv = ["--checkpoint", str(tmp_path / "out"), "--data", str(test), "--cache-dir", str(tmp_path / "cache"),
            "--quiet", "--out", str(tmp_path / "sub.csv")]
    res = evaluate.main(evaluate.parse_args(argv))
    assert "1 labels never seen in training count as misses" in capsys.readouterr().out
    assert all("Never_seen" not in p for p in res["predictions"][0])  # still predicted, from known labels
    (tmp_path / "out" / "head.safetensors").unlink()
    os.remove(tmp_path / "sub.csv")
    assert "head.safetensors: missing from the checkpoint" in cli_error(evaluate, argv)
    assert "not a checkpoint (no meta.json)" in cli_error(evaluate, replace(argv, "--checkpoint", str(tmp_path)))
    assert not (tmp_path / "sub.csv").exists()


# ----------------------------------------------------------------------------- nothing lost

def start_and_stop(argv, cache, sig, min_chunks):
    """Start train.py, send sig once min_chunks cache chunks exist; return its stderr and exit code.
    The run is eager (--no-compile): a cold torch.compile cache made the first chunk come late and
    the rest of a run so quick that it could end before the signal (once in CI)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv, "--no-compile"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while len(list(cache.glob("*/chunk-*.safetensors"))) < min_chunks and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal was sent: give it more texts"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return out, err, proc.returncode


def test_killed_run_resumes_with_fewer_forward_passes(tmp_path, tiny):
    data = write_csv(tmp_path / "big.csv", n=3000)
    cache = tmp_path / "cache"
    argv = ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(cache), "--cache-chunk", "100",
            "--epochs", "1", "--hidden", "8", "8", "--quiet"]
    out, err, code = start_and_stop(argv, cache, signal.SIGINT, 1)  # Ctrl-C
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    out, err, code = start_and_stop(argv, cache, signal.SIGKILL, len(list(cache.glob("*/chunk-*"))) + 2)
    assert code == -signal.SIGKILL
    n_chunks = len(list(cache.glob("*/chunk-*.safetensors")))
    done = cached_keys(cache)
    texts = render(train.MAP_TEMPLATE, read_csv(data)[1])
    distinct = len(set(texts))
    logs = []
    resumed = embed_cache.embed(texts, str(tiny), max_length=512, cache_dir=cache, chunk_size=100, **PINNED_KW,
                                progress=False, log=logs.append)[None]
    cached, computed = embedded(logs[0])
    assert n_chunks >= 3 and computed == distinct - len(done) > 0  # only what the killed runs lacked
    assert cached + computed == distinct and f"{len(texts)} rows, {distinct} distinct texts" in logs[0]
    fresh = embed_cache.embed(texts, str(tiny), max_length=512, cache_dir=tmp_path / "fresh", progress=False, **PINNED_KW,
                              log=lambda *_: None)[None]
    assert torch.allclose(resumed, fresh, atol=1e-5)
    assert not list(cache.glob("*/chunk-*[!s]"))  # only complete .safetensors chunks under their real names


def test_sigterm_writes_what_was_computed_and_the_rerun_ends_the_same(tmp_path, tiny):
    """SIGTERM (Slurm's time limit, docker stop, a notebook ending) is Ctrl-C: pending vectors
    written, one line, exit 143; the rerun computes only the rest and writes the same submission."""
    data = write_csv(tmp_path / "big.csv", n=3000)
    cache = tmp_path / "cache"
    argv = ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(cache), "--cache-chunk", "100",
            "--epochs", "1", "--hidden", "8", "8", "--quiet"]
    out, err, code = start_and_stop(argv + ["--out", str(tmp_path / "a")], cache, signal.SIGTERM, 1)
    assert code == 143 and err.startswith("terminated (SIGTERM): the vectors computed so far are cached") and (
        "Traceback" not in err), err
    done = len(cached_keys(cache))
    logs = []
    train.main(train.parse_args(argv + ["--out", str(tmp_path / "a")]), log=logs.append)
    cached, computed = embedded(next(line for line in logs if "cached" in line))
    assert cached >= done > 0 and computed <= 3000 - cached  # only the rows still missing
    train.main(train.parse_args(replace(argv, "--cache-dir", str(tmp_path / "fresh")) + ["--out", str(tmp_path / "b")]),
               log=lambda *_: None)  # the same run, never interrupted, on a cache of its own
    subs = []
    for run in ("a", "b"):
        evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / run), "--data", str(data), "--device", "cpu",
                                           "--cache-dir", str(cache), "--quiet", "--out", str(tmp_path / f"{run}.csv")]))
        subs.append((tmp_path / f"{run}.csv").read_text())
    assert subs[0] == subs[1]


def test_corrupt_cache_chunks_are_recomputed(tmp_path, tiny):
    texts = [f"text number {i}" for i in range(30)]
    kw = dict(cache_dir=tmp_path / "c", chunk_size=10, batch_size=10, progress=False, **PINNED_KW)
    first = embed_cache.embed(texts, str(tiny), log=lambda *_: None, **kw)[None]
    chunks = sorted(tmp_path.glob("c/*/chunk-*.safetensors"))
    assert len(chunks) == 3
    chunks[0].write_bytes(chunks[0].read_bytes()[:100])           # truncated
    t = load_file(chunks[1])
    save_file({"keys": t["keys"], "vectors": t["vectors"][:, :5].contiguous()}, str(chunks[1]))  # wrong shape
    stale = chunks[0].parent / ".chunk-abc.safetensors.x1y2"  # what a kill in mid-write leaves
    stale.mkdir()
    (stale / "tmp").write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    logs = []
    again = embed_cache.embed(texts, str(tiny), log=logs.append, **kw)[None]
    assert embedded(logs[0]) == (10, 20)
    assert not stale.exists()
    assert torch.allclose(first, again, atol=1e-6)


def test_nan_vectors_are_reported_and_never_cached(tmp_path, tiny):
    model = shutil.copytree(tiny, tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    from tokenizers import Tokenizer
    poisoned = Tokenizer.from_file(str(model / "tokenizer.json")).token_to_id("Z")
    weights["embed_tokens.weight"][poisoned] = float("nan")
    save_file(weights, str(model / "model.safetensors"))
    texts = ["fine", "also fine", "Z", "fine again"]
    with pytest.raises(FloatingPointError, match=r"rows \['c'\]; nothing of them was cached"):
        embed_cache.embed(texts, str(model), cache_dir=tmp_path / "c", progress=False, ids=list("abcd"),
                          log=lambda *_: None)
    assert not list(tmp_path.glob("c/*/chunk-*"))


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    from data import atomic_path
    target = tmp_path / "sub.csv"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise KeyboardInterrupt  # Ctrl-C in mid-write
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["sub.csv"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["sub.csv"]
    folder = tmp_path / "ckpt"
    for content in ("v1", "v2"):  # a folder replaces a folder whole
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "meta.json").write_text(content)
    assert sorted(os.listdir(folder)) == ["manifest.json", "meta.json"]  # what it wrote, listed
    assert (folder / "meta.json").read_text() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "sub.csv"]


# ----------------------------------------------------------------------------- safety

def test_no_pickle_and_no_remote_code_in_the_product():
    for file in [*ROOT.glob("*.py"), *ROOT.glob("at_scale/*.py"), *ROOT.glob("tools/*.py")]:
        source = file.read_text()
        for forbidden in (r"torch\.load", r"import pickle|pickle\.load", r"trust_remote_code", r"np\.load", r"numpy\.load",
                          r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
            assert not re.search(forbidden, source), f"{file.name} uses {forbidden}"


PRODUCT = ["qwen_embed.py", "mlp_head.py", "train.py", "evaluate.py", "research.py", "fit.py", "cli.py", "data.py",
           "at_scale/weights.py", "at_scale/runtime.py", "at_scale/embed_cache.py", "at_scale/embedder.py",
           "at_scale/lora.py", "at_scale/torchrun.py", "at_scale/fingerprint.py",
           "tools/random_checkpoint.py"]  # tools/plot.py, tools/st_vectors.py: dev tools


def test_requirements_list_every_package_the_product_imports():
    """Every import of the product that is neither the standard library nor one of its own files is
    a package of requirements.txt (by its import name), and the product imports no test reference."""
    local = {f.stem for f in ROOT.glob("*.py")} | {"at_scale", "tools"}
    imported, where = set(), {}  # where: package -> (file, imported at the top level?)
    for name in PRODUCT:
        tree = ast.parse((ROOT / name).read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found = [node.module.split(".")[0]]
            else:
                continue
            imported.update(found)
            where.update({package: (name, id(node) in top) for package in found})
    third_party = imported - set(sys.stdlib_module_names) - local
    text = (ROOT / "requirements.txt").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    required = {re.split(r"[<>=!~ \[]", line)[0].lower().replace("-", "_") for line in lines if line}
    optional = dict(re.findall(r"^#\s+optional (\w+)\S* in (\S+\.py)", text, re.M))
    assert optional == {"optuna": "research.py"}
    for package, file in optional.items():  # only there, and inside a function
        assert where[package] == (file, False), (package, where[package])
    # numpy is never imported by name: torch needs it for Tensor.numpy(), which the cache calls.
    assert third_party | {"numpy"} == required | optional.keys(), (sorted(third_party), sorted(required))
    assert not third_party & {"transformers", "sentence_transformers", "peft", "matplotlib"}


def test_a_field_longer_than_pythons_csv_limit_is_read(tmp_path):
    long = "seven eighths " * 20_000  # 280,000 characters: one long document
    data = tmp_path / "long.csv"
    data.write_text(f"row_id,Text,Label\n1,\"{long}\",a\n2,short,b\n", encoding="utf-8")
    columns, rows = read_csv(data)
    assert rows[0]["Text"] == long and render("{Text}", rows) == [long, "short"]


@pytest.mark.parametrize("questions, message", [
    (3, "--folds 5: only 3 groups in --group-col"),
    (1, "--folds 5: only 1 groups in --group-col")])
def test_fold_and_group_checks_come_before_any_work_and_name_the_flag_given(tmp_path, tiny, monkeypatch, questions,
                                                                            message):
    columns, rows = read_csv(write_csv(tmp_path / "six.csv", n=30))  # 6 questions
    data = tmp_path / "train.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows({**row, "QuestionId": int(row["QuestionId"]) % questions} for row in rows)
    calls = count_forward_passes(monkeypatch)
    error = cli_error(train, ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(tmp_path / "c"),
                              "--folds", "5", "--group-col", "QuestionId", "--quiet"])
    assert error == f"error: {message}" and not calls


# ----------------------------------------------------------------------------- properties

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)  # a UTF-8 file holds no surrogates
CELL = st.one_of(TEXT, st.sampled_from(["", "NA", '"', ",", "\n", "\r\n", "\x00", "  ", "\ufeff"]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(CELL, CELL), min_size=1, max_size=8))
def test_csv_round_trip_and_render(tmp_path_factory, cells):
    import csv
    path = tmp_path_factory.mktemp("csv") / "r.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row_id", "A", "B"])
        w.writerows([i, a, b] for i, (a, b) in enumerate(cells))
    columns, rows = read_csv(path)
    assert columns == ["row_id", "A", "B"]
    assert [(r["A"], r["B"]) for r in rows] == list(cells)
    assert render("{B}|{A}", rows) == [f"{b}|{a}" for a, b in cells]


@pytest.fixture(scope="module")
def embedder(tiny):
    from at_scale.embedder import Embedder
    return Embedder.from_pretrained(tiny, **PINNED_KW)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(TEXT, st.just(""), st.text(max_size=3).map(lambda s: s * 2000)), min_size=1, max_size=5),
       st.integers(2, 64))
def test_tokenize_and_embed_never_crash_and_stay_aligned(embedder, texts, max_length):
    eos = embedder.eos_id
    for ids in embedder.tokenize(texts, max_length=max_length):
        assert 1 <= len(ids) <= max_length and ids[-1] == eos
    vecs = embedder.encode(texts, max_length=max_length, batch_size=2, progress=False)
    assert vecs.shape == (len(texts), embedder.dim) and torch.isfinite(vecs).all()
    for i in {0, len(texts) - 1}:  # each row is its own text's vector
        assert torch.allclose(vecs[i], embedder.encode([texts[i]], max_length=max_length, progress=False)[0], atol=1e-5)


def test_flag_checks_never_touch_the_network(tmp_path, monkeypatch):
    """With the Hub unreachable, a bad flag on a Hub model id is the flag's one-line error."""
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise AssertionError("the network was reached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    data = write_csv(tmp_path / "train.csv")
    base = ["--data", str(data), "--model", "Qwen/Qwen3-Embedding-0.6B", "--cache-dir", str(tmp_path / "c")]
    for flags, message in ((["--folds", "1"], "--folds must be 0"),
                           (["--lora-rank", "4", "--lora-layers", "0"], "--lora-layers must be between 1"),
                           (["--lora-rank", "4", "--folds", "3"], "--lora-rank trains on one split")):
        assert message in cli_error(train, base + flags)
