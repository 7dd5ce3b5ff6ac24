"""Long runs lose nothing: time-limited cache writes, compaction, out-of-GPU-memory recovery, two
runs on one cache, Ctrl-C and SIGTERM in the head phase, a full disk at every write."""

import errno
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save_file as real_save_file

from at_scale import embed_cache, fingerprint
import evaluate
import mlp_head
import train
from data import read_csv, render
from helpers import PINNED, PINNED_KW, ROOT, cached_keys, cli_error, count_forward_passes, embedded, write_csv
from at_scale.embedder import Embedder
from qwen_embed import Qwen3Model

NUMBERED_TEXTS = [f"text number {i} " + "word " * (i % 17) for i in range(30)]


def chunk_files(cache):
    return sorted(cache.glob("*/chunk-*.safetensors"))


def test_a_chunk_is_written_when_its_time_is_up(tmp_path, tiny):
    # A count limit never reached: only the time limit writes, once per batch here.
    embed_cache.embed(NUMBERED_TEXTS, str(tiny), cache_dir=tmp_path, chunk_size=10**6, chunk_seconds=1e-9, batch_size=10,
                      progress=False, log=lambda *_: None, **PINNED_KW)
    assert [len(load_file(f)["keys"]) for f in chunk_files(tmp_path)] == [10, 10, 10]


def test_many_small_chunks_are_compacted_and_load_the_same(tmp_path, tiny):
    texts = NUMBERED_TEXTS * 4 + [t + "!" for t in NUMBERED_TEXTS]  # 60 distinct
    kw = dict(cache_dir=tmp_path, progress=False, log=lambda *_: None, **PINNED_KW)
    first = embed_cache.embed(texts, str(tiny), chunk_seconds=1e-9, batch_size=5, **kw)[None]
    assert len(chunk_files(tmp_path)) == 1 and len(cached_keys(tmp_path)) == 60  # 12 chunks, merged into one
    logs = []
    again = embed_cache.embed(texts, str(tiny), cache_dir=tmp_path, progress=False, log=logs.append, **PINNED_KW)[None]
    assert "no forward pass" in logs[0] and torch.equal(first, again)


def test_compaction_is_safe_against_a_kill_and_a_concurrent_run(tmp_path, tiny, monkeypatch):
    spec = {"test": 1}
    cache = embed_cache.Cache(tmp_path, spec, "weights")
    keys, vectors = embed_cache.text_keys(NUMBERED_TEXTS), torch.randn(len(NUMBERED_TEXTS), 4)
    for s in range(0, 30, 3):
        cache.save(keys[s:s + 3], vectors[s:s + 3])
    files = chunk_files(tmp_path)
    # A kill after the merged file is in place but before the chunks are deleted: duplicates only.
    cache.save(keys, vectors)
    assert len(cache.present(4)) == 30
    # A concurrent run merged two chunks away between our listing and our reading: they are skipped,
    # never reported as corrupt, and the merged file still holds their vectors.
    original = cache.read

    def other_run_deletes(file, dim):
        if file in files[:2]:
            file.unlink(missing_ok=True)
        return original(file, dim)

    monkeypatch.setattr(cache, "read", other_run_deletes)
    cache.compact(4, max_files=2)
    monkeypatch.undo()
    assert len(chunk_files(tmp_path)) == 1
    assert torch.equal(cache.load([bytes(k) for k in keys.numpy()], 4), vectors)
    # Another run merged a chunk away after we read its keys and before we read its vectors (seen
    # twice in a loaded CI as "No such file or directory: chunk-..."): read from the merged file.
    for s in range(0, 30, 10):
        cache.save(keys[s:s + 10], vectors[s:s + 10])
    original_rows, merged = cache.read_rows, []

    def merged_meanwhile(file, hits, out):
        if not merged:  # once, as the other run: merge everything, delete the chunks
            merged.append(file)
            monkeypatch.setattr(cache, "read_rows", original_rows)
            cache.compact(4, max_files=0)
        return original_rows(file, hits, out)

    monkeypatch.setattr(cache, "read_rows", merged_meanwhile)
    order = [bytes(k) for k in keys.flip(0).numpy()]
    assert torch.equal(cache.load(order, 4), vectors.flip(0)) and not merged[0].exists()


def fail_above(monkeypatch, max_tokens):
    """Qwen3Model.forward raises CUDA's out-of-memory error for batches over max_tokens tokens."""
    original = Qwen3Model.forward
    sizes = []

    def forward(self, input_ids, lengths, return_layers=False, attend=None):
        sizes.append((len(input_ids), len(lengths)))
        if len(input_ids) > max_tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, input_ids, lengths, return_layers, attend)

    monkeypatch.setattr(Qwen3Model, "forward", forward)
    return sizes


def test_out_of_gpu_memory_splits_the_batch_and_keeps_the_smaller_budget(tmp_path, tiny, monkeypatch, capsys):
    expected = embed_cache.embed(NUMBERED_TEXTS, str(tiny), cache_dir=tmp_path / "a", progress=False, log=lambda *_: None,
                                 **PINNED_KW)[None]
    sizes = fail_above(monkeypatch, 100)
    logs = []
    got = embed_cache.embed(NUMBERED_TEXTS, str(tiny), cache_dir=tmp_path / "b", log=logs.append, **PINNED_KW)[None]
    assert torch.allclose(got, expected, atol=1e-5)
    said = capsys.readouterr().out
    assert said.count("out of GPU memory") == 1, said  # said once, then the smaller budget is kept
    budget = int(said.split("carrying on with at most ")[1].split()[0])
    first_fit = next(i for i, (n, _) in enumerate(sizes) if n <= 100)  # halved until it fitted, then kept
    assert budget <= 100 and all(n <= budget or texts == 1 for n, texts in sizes[first_fit:])


def test_a_text_too_long_for_the_gpu_alone_is_one_line_after_saving(tmp_path, tiny, monkeypatch):
    data = tmp_path / "d.csv"
    rows = ["row_id,StudentExplanation,Category,Misconception"] + [f"r{i},{'short ' * 3}{i},A,NA" for i in range(40)]
    rows.append("huge," + "long text " * 60 + ",B,NA")
    data.write_text("\n".join(rows) + "\n")
    fail_above(monkeypatch, 100)
    cache = tmp_path / "cache"
    message = cli_error(train, ["--data", str(data), "--model", str(tiny), *PINNED, "--text-template",
                                "{StudentExplanation}", "--cache-dir", str(cache), "--quiet", "--batch-size", "8"])
    from tokenizers import Tokenizer
    n = len(Tokenizer.from_file(str(tiny / "tokenizer.json")).encode("long text " * 60, add_special_tokens=False).ids)
    assert f"row huge: its {n + 1} tokens do not fit in GPU memory even alone; the 40 vectors computed so far " \
           f"are cached; lower --max-length" in message
    assert len(cached_keys(cache)) == 40


def test_two_runs_at_once_on_one_cache(tmp_path, tiny):
    data = write_csv(tmp_path / "big.csv", n=3000)
    cache = tmp_path / "cache"
    argv = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--model", str(tiny), *PINNED,
            "--cache-dir", str(cache), "--cache-seconds", "0.05", "--epochs", "1", "--hidden", "8", "8", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv + ["--seed", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env) for s in (1, 2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "warning" not in out + err, err
    texts = render(train.MAP_TEMPLATE, read_csv(data)[1])
    logs = []
    shared = embed_cache.embed(texts, str(tiny), max_length=512, cache_dir=cache, progress=False, log=logs.append,
                               **PINNED_KW)[None]
    assert "no forward pass" in logs[0] and len(chunk_files(cache)) <= embed_cache.COMPACT_AT
    fresh = embed_cache.embed(texts, str(tiny), max_length=512, cache_dir=tmp_path / "fresh", progress=False,
                              log=lambda *_: None, **PINNED_KW)[None]
    assert torch.allclose(shared, fresh, atol=1e-5)


@pytest.mark.parametrize("flags, progress, sig", [(["--sweep", "500"], "sweep trials", signal.SIGINT),
                                                  (["--folds", "5"], "in fold ", signal.SIGINT),
                                                  (["--folds", "5"], "in fold ", signal.SIGTERM)])
def test_ctrl_c_in_the_head_phase_says_how_far_it_got_and_writes_nothing(tmp_path, tiny, flags, progress, sig):
    data = write_csv(tmp_path / "train.csv", n=400)
    base = ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(tmp_path / "cache")]
    train.main(train.parse_args(base + ["--epochs", "1"]), log=lambda *_: None)  # the vectors are cached
    epochs = [] if "--sweep" in flags else ["--epochs", "40"]  # a sweep draws its own
    argv = base + epochs + ["--out", str(tmp_path / "out")] + flags
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py")] + argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # into the head phase: the second fold or the second trial
        if line.startswith(("fold 1", "trial   1")):
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err  # 130 for Ctrl-C, 143 for SIGTERM
    said = "interrupted: " if sig == signal.SIGINT else "terminated (SIGTERM): "
    assert err.startswith(said) and progress in err and "no checkpoint was written" in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- a full disk

def disk_full_at(n):
    """A stand-in for safetensors' save_file whose n-th call (and every later one) finds the disk
    full, raising as safetensors does; the earlier calls write for real."""
    calls = []

    def save_file(tensors, filename, *args, **kw):
        calls.append(filename)
        if len(calls) >= n:
            with open(filename, "wb") as f:  # half a file, as a real full disk leaves
                f.write(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *args, **kw)
    return save_file


def leftovers(folder):
    return [p for p in folder.rglob(".*") if p.name.startswith((".chunk", ".spec", ".out", ".sub"))]


def test_a_full_disk_while_embedding_is_one_line_and_the_rerun_resumes(tmp_path, tiny, monkeypatch):
    data = write_csv(tmp_path / "train.csv", n=200)
    cache = tmp_path / "cache"
    argv = ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(cache), "--batch-size", "20",
            "--cache-seconds", "1e-9", "--epochs", "1", "--hidden", "8", "8", "--quiet", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(embed_cache, "save_file", disk_full_at(4))  # 3 chunks written, then the disk is full
    message = cli_error(train, argv)
    folder = next(d for d in cache.iterdir() if d.is_dir())
    assert message.startswith(f"error: {folder}: no space left on the disk while writing chunk-")
    assert re.search(r"MB free there\); nothing half-written was kept\. 60 of the \d+ vectors to compute are "
                     r"cached; the other \d+ need [\d.]+ MB more: free that much and run again to resume$", message)
    assert not leftovers(tmp_path) and not (tmp_path / "out").exists()
    monkeypatch.setattr(embed_cache, "save_file", real_save_file)  # space freed
    logs = []
    train.main(train.parse_args(argv), log=logs.append)
    cached, computed = embedded(next(line for line in logs if "cached" in line))
    assert computed == 198 - 60 and cached >= 60 and (tmp_path / "out").exists()  # 198 distinct texts in 200 rows


def test_a_full_disk_at_compaction_keeps_the_chunks(tmp_path, tiny, monkeypatch):
    texts = [f"text {i}" for i in range(40)]
    kw = dict(cache_dir=tmp_path, progress=False, chunk_seconds=1e-9, batch_size=4, **PINNED_KW)
    merged = disk_full_at(11)  # the 10 chunks are written; the merged file finds the disk full
    monkeypatch.setattr(embed_cache, "save_file", merged)
    logs = []
    vectors = embed_cache.embed(texts, str(tiny), log=logs.append, **kw)[None]
    assert any(line.startswith("warning: ") and "no space left" in line and "keeps its chunk files" in line
               for line in logs)
    assert len(chunk_files(tmp_path)) == 10 and not leftovers(tmp_path)
    monkeypatch.setattr(embed_cache, "save_file", real_save_file)
    again = embed_cache.embed(texts, str(tiny), log=lambda *_: None, **kw)[None]
    assert torch.equal(vectors, again) and len(chunk_files(tmp_path)) == 1  # merged once there is room


def test_a_full_disk_at_the_checkpoint_and_the_submission(tmp_path, tiny, monkeypatch):
    data = write_csv(tmp_path / "train.csv")
    argv = ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--hidden", "8", "8", "--quiet", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(mlp_head, "save_file", disk_full_at(1))
    message = cli_error(train, argv)
    assert message.startswith(f"error: --out {tmp_path / 'out'}: {tmp_path}: no space left on the disk while writing "
                              f"out (") and "the checkpoint needs about" in message and "a rerun goes straight" in message
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    monkeypatch.setattr(mlp_head, "save_file", real_save_file)
    train.main(train.parse_args(argv), log=lambda *_: None)

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(evaluate.csv, "writer", full)
    message = cli_error(evaluate, ["--checkpoint", str(tmp_path / "out"), "--data", str(data), "--device", "cpu",
                                   "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(tmp_path / "sub.csv")])
    assert "no space left on the disk while writing sub.csv" in message and "a rerun only predicts" in message
    assert not (tmp_path / "sub.csv").exists() and not leftovers(tmp_path)


def test_an_undecided_spec_is_never_hashed():
    """dtype None and weights "auto" are requests: hashing them would key vectors by what was asked,
    not by what computed them."""
    for spec in (embed_cache.EmbedSpec("m"), embed_cache.EmbedSpec("m", dtype="float32"),
                 embed_cache.EmbedSpec("m", weights="int8")):
        with pytest.raises(RuntimeError, match="decide"):
            spec.key("checkpoint")
    assert embed_cache.EmbedSpec("m", dtype="float32", weights="int8").key("c")["weights"] == "int8-g32"


@pytest.mark.parametrize("weights, eos", [("none", True), ("int8", True), ("int4", False)])
def test_a_cache_written_before_is_found(tmp_path, tiny, monkeypatch, weights, eos):
    """The spec that keys the cache keeps its names and values: vectors cached under the spec dict
    as the code wrote it before EmbedSpec (written here by hand: "weights" only when quantized,
    named with its group, "eos" only when False; the vectors by the model) are found, and no
    forward pass runs."""
    texts = NUMBERED_TEXTS[:5]
    before = {"checkpoint": embed_cache.checkpoint_identity(tiny), "model": str(tiny), "instruction": None,
              "max_length": 8192, "dim": None, "dtype": "float32", "pooling": "last", "layer": None}
    before.update({} if weights == "none" else {"weights": f"{weights}-g32"})
    before.update({} if eos else {"eos": False})
    model = Embedder.from_pretrained(tiny, quantize=weights, **PINNED_KW)
    vectors = model.encode(texts, progress=False, append_eos=eos)
    content = fingerprint.model_identity(tiny, tmp_path)
    embed_cache.Cache(tmp_path, before, content).save(embed_cache.text_keys(texts), vectors)
    calls = count_forward_passes(monkeypatch)
    logs = []
    got = embed_cache.embed(texts, str(tiny), cache_dir=tmp_path, progress=False, log=logs.append, weights=weights,
                            eos=eos, **PINNED_KW)[None]
    assert not calls and "no forward pass" in logs[0]
    assert torch.equal(got, vectors)
