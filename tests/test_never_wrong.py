"""Never silently wrong, never destructive: each way a skeptical user broke the guarantees, through
the real programs. Nothing a user owns is deleted; vectors follow every byte of the weights;
evaluation embeds with the model training used; what must stay in step with the code is derived
from it; validation never sees its own labels; a diverged head is never saved; every flag is
checked before any forward pass."""

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import evaluate
import fit
import mlp_head
import train
from at_scale import embed_cache, fingerprint
from at_scale.embed_cache import EmbedSpec
from data import read_csv, restore
from helpers import PINNED, ROOT, cli_error, count_forward_passes, write_csv
from mlp_head import MLPHead, load_checkpoint, save_checkpoint
from tools.random_checkpoint import make_checkpoint


@pytest.fixture()
def run(tmp_path, tiny):
    """train.py's flags for a quick run on the tiny checkpoint, its checkpoint in tmp_path/out."""
    write_csv(tmp_path / "train.csv", n=48)
    return ["--data", str(tmp_path / "train.csv"), "--model", str(tiny), *PINNED, "--cache-dir",
            str(tmp_path / "cache"), "--epochs", "2", "--hidden", "8", "8", "--quiet", "--out",
            str(tmp_path / "out")]


def replaced(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


# ----------------------------------------------------------------------------- nothing deleted

def test_out_onto_a_folder_of_the_users_files_is_refused_and_they_stay(tmp_path, run, monkeypatch):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "train.csv").write_text("my data")
    (mine / "notes.txt").write_text("my notes")
    calls = count_forward_passes(monkeypatch)
    for mode in ([], ["--layer-sweep"]):  # a checkpoint, or a layer sweep's tables
        message = cli_error(train, replaced(run, "--out", str(mine)) + mode)
        assert "holds files no run wrote (notes.txt, train.csv)" in message
    assert cli_error(train, replaced(run, "--out", str(mine / "notes.txt"))).endswith(
        "is a file, not a folder; name a new folder")
    assert not calls
    assert sorted(os.listdir(mine)) == ["notes.txt", "train.csv"]
    assert (mine / "notes.txt").read_text() == "my notes"
    # evaluate.py --out: a folder, or a file it did not write, is refused before any work
    train.main(train.parse_args(run), log=lambda _: None)
    calls.clear()
    argv = ["--checkpoint", str(tmp_path / "out"), "--data", str(tmp_path / "train.csv"),
            "--cache-dir", str(tmp_path / "other-cache"), "--quiet", "--out"]
    assert "is a folder; name a new file" in cli_error(evaluate, argv + [str(mine)])
    assert "is a file this program did not write" in cli_error(evaluate,
                                                                argv + [str(mine / "notes.txt")])
    assert not calls and (mine / "notes.txt").read_text() == "my notes"
    evaluate.main(evaluate.parse_args(argv + [str(tmp_path / "sub.csv")]))
    evaluate.main(evaluate.parse_args(argv + [str(tmp_path / "sub.csv")]))  # its own: replaced


def test_out_onto_a_previous_run_replaces_it(tmp_path, run):
    train.main(train.parse_args(run), log=lambda _: None)
    first = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(first) == set(os.listdir(tmp_path / "out")) - {"manifest.json"}
    train.main(train.parse_args(run + ["--folds", "2"]), log=lambda _: None)
    now = sorted(os.listdir(tmp_path / "out"))
    assert "head-1.safetensors" in now and "head.safetensors" not in now  # replaced whole
    # a folder of the runs of before manifests: recognised by the names they wrote
    (tmp_path / "out" / "manifest.json").unlink()
    train.main(train.parse_args(run), log=lambda _: None)
    assert (tmp_path / "out" / "head.safetensors").is_file()


def checkpoint(labels):
    head = MLPHead(4, len(labels), hidden=(3, 3))
    return [head], labels


def fs_operations():
    """The file-system operations a folder write does, each a place a kill can land."""
    return [(os, "replace"), (shutil, "rmtree"), (Path, "write_text"), (Path, "mkdir"),
            (mlp_head, "save_file"), (tempfile, "mkdtemp")]


def write_killed_at(step, folder, labels):
    """In a forked child: write a checkpoint of labels over folder, SIGKILL-like exit (os._exit,
    no cleanup) just before file-system operation number step. True if it ran to the end first."""
    pid = os.fork()
    if pid == 0:
        count = [0]
        for owner, name in fs_operations():
            original = getattr(owner, name)

            def counted(*a, _original=original, **k):
                count[0] += 1
                if count[0] == step:
                    os._exit(9)
                return _original(*a, **k)
            setattr(owner, name, counted)
        try:
            save_checkpoint(folder, *checkpoint(labels), {"spec": "x"})
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1] == 0


def test_a_kill_at_each_step_of_replacing_a_run_leaves_one_whole_run(tmp_path):
    folder = tmp_path / "run"
    save_checkpoint(folder, *checkpoint(["old-a", "old-b"]), {"spec": "x"})
    outcomes, step = set(), 1
    while not write_killed_at(step, folder, ["new-a", "new-b", "new-c"]):
        restore(folder, log=lambda _: None)  # what the next run does first (check_out)
        _, meta = load_checkpoint(folder)  # a whole run: every head file its meta names
        outcomes.add(meta["labels"][0])
        assert data.ours(folder) is not None and not data.leftovers(folder)
        step += 1
    assert step > 8  # every operation of the write was a kill point
    assert outcomes == {"old-a", "new-a"}  # before the swap the old run, after it the new one
    assert load_checkpoint(folder)[1]["labels"][0] == "new-a"


# ----------------------------------------------------------------------------- every byte of the weights

def test_weights_changed_in_place_are_seen_and_an_unchanged_file_is_not_read_again(tmp_path,
                                                                                    monkeypatch):
    model = make_checkpoint(tmp_path / "model", layers=6, hidden=256, intermediate=512)
    texts = ["one third", "a half is bigger", "the decimal point moves"]
    kw = dict(cache_dir=tmp_path / "cache", device="cpu", dtype="float32", progress=False)
    reads = []
    digest = fingerprint.hashlib.file_digest
    monkeypatch.setattr(fingerprint.hashlib, "file_digest",
                        lambda f, name: reads.append(f.name) or digest(f, name))
    before = embed_cache.embed(texts, str(model), log=lambda _: None, **kw)[None]
    assert len(reads) == 3  # config, tokenizer, weights: each read once
    said = []
    embed_cache.embed(texts, str(model), log=said.append, **kw)
    assert len(reads) == 3 and any("no forward pass" in line for line in said)
    # LoRA-style: a middle block's weights changed, saved over the file: same size, same header
    file = model / "model.safetensors"
    name = "layers.3.mlp.down_proj.weight"
    changed = load_file(file)[name] + 0.05 * torch.randn(256, 512)
    identity, size = embed_cache.checkpoint_identity(model), file.stat().st_size
    with open(file, "r+b") as f:  # the tensor's bytes rewritten where they are
        n = int.from_bytes(f.read(8), "little")
        start = json.loads(f.read(n))[name]["data_offsets"][0]
        f.seek(8 + n + start)
        f.write(changed.numpy().tobytes())
    assert torch.equal(load_file(file)[name], changed)
    assert file.stat().st_size == size and embed_cache.checkpoint_identity(model) == identity
    said = []
    after = embed_cache.embed(texts, str(model), log=said.append, **kw)[None]
    assert any("weights changed since these vectors were cached" in line for line in said), said
    fresh = embed_cache.embed(texts, str(model), log=lambda _: None,
                              **{**kw, "cache_dir": tmp_path / "fresh"})[None]
    assert torch.equal(after, fresh) and not torch.equal(after, before)


# ----------------------------------------------------------------------------- evaluation's model

def test_evaluation_refuses_other_weights_and_accepts_a_moved_copy(tmp_path, run, monkeypatch):
    model = make_checkpoint(tmp_path / "model", layers=2)
    argv = replaced(run, "--model", str(model))
    train.main(train.parse_args(argv), log=lambda _: None)
    shutil.copytree(model, tmp_path / "moved")
    ev = ["--checkpoint", str(tmp_path / "out"), "--data", str(tmp_path / "train.csv"),
          "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    moved = evaluate.main(evaluate.parse_args(ev + ["--model", str(tmp_path / "moved")]))
    assert moved["map3"] == evaluate.main(evaluate.parse_args(ev))["map3"]
    make_checkpoint(model, layers=2, seed=1)  # other weights, in the same folder
    calls = count_forward_passes(monkeypatch)
    message = cli_error(evaluate, ev)
    assert "differs from the model the head was trained with" in message and str(model) in message
    assert not calls
    # a checkpoint of before identities: a note, and a head that does not fit is refused
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    del meta["embedding"]["model_identity"]
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    wide = make_checkpoint(tmp_path / "wide", layers=2, hidden=96)
    message = cli_error(evaluate, ev + ["--model", str(wide)])
    assert message.endswith("gives 96-d vectors, the head takes 64") and not calls


# ----------------------------------------------------------------------------- derived, not listed

def test_the_cache_key_is_todays_for_todays_fields_and_a_new_field_enters_off_its_default():
    spec = EmbedSpec("m", dtype="float32", weights="none")
    today = {"checkpoint": "c", "model": "m", "instruction": None, "max_length": 8192, "dim": None,
             "dtype": "float32", "pooling": "last", "layer": None}  # the key before this change
    assert spec.key("c") == today
    assert EmbedSpec("m", dtype="float32", weights="int4", eos=False).key("c") == {
        **today, "weights": "int4-g32", "eos": False}
    Newer = dataclasses.make_dataclass("Newer", [("temperature", float, 1.0)], bases=(EmbedSpec,),
                                       frozen=True)
    assert Newer("m", dtype="float32", weights="none").key("c") == today
    assert Newer("m", dtype="float32", weights="none", temperature=0.5).key("c") == {
        **today, "temperature": 0.5}


def test_head_options_come_from_the_constructor_and_unknown_ones_are_refused(tmp_path, run):
    import inspect
    head = MLPHead(8, 3, input_norm=True)
    assert list(head.hparams) == list(inspect.signature(MLPHead).parameters)
    train.main(train.parse_args(run), log=lambda _: None)
    ev = ["--checkpoint", str(tmp_path / "out"), "--data", str(tmp_path / "train.csv"),
          "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    meta_file = tmp_path / "out" / "meta.json"
    meta = json.loads(meta_file.read_text())
    for where, key, value, said in [
            ("head", "residual", True, "head has option(s) ['residual']"),
            ("head", "activation", "swish", "activation must be one of"),
            ("embedding", "temperature", 0.5, "the embedding records ['temperature']")]:
        meta_file.write_text(json.dumps({**meta, where: {**meta[where], key: value}}))
        assert said in cli_error(evaluate, ev)


def test_one_loss_builder_for_every_way_of_training(tmp_path, run, monkeypatch):
    built = []
    original = fit.make_loss
    monkeypatch.setattr(fit, "make_loss", lambda args, y: built.append(len(y)) or original(args, y))
    train.main(train.parse_args(run), log=lambda _: None)
    train.main(train.parse_args(run + ["--folds", "2"]), log=lambda _: None)
    train.main(train.parse_args(run + ["--lora-rank", "2", "--epochs", "1"]), log=lambda _: None)
    assert len(built) == 1 + 2 + 1  # one split, two folds, LoRA


@pytest.mark.parametrize("mode, flag", [  # (a head flag with --sweep fixes that option instead)
    (["--layer-sweep"], ["--layer", "-1"]),
    (["--layer-sweep"], ["--save-vectors", "v.safetensors"]),
    (["--compare-pooling"], ["--pooling", "last"]),  # at its default value, still refused
    (["--lora-rank", "2"], ["--no-compile"]),
    ([], ["--lora-alpha", "8"]),
    (["--folds", "2"], ["--val-frac", "0.2"]),
])
def test_a_flag_the_mode_ignores_or_sets_is_refused_naming_the_mode(run, mode, flag, monkeypatch):
    argv = run
    calls = count_forward_passes(monkeypatch)
    message = cli_error(train, argv + mode + flag)
    assert flag[0] in message and (mode[0] if mode else "without --lora-rank") in message
    assert not calls


# ----------------------------------------------------------------------------- honest validation

def test_map_correct_finds_answers_from_the_training_rows_of_each_split(tmp_path, tiny, capsys):
    write_csv(tmp_path / "train.csv", n=48)
    base = ["--data", str(tmp_path / "train.csv"), "--model", str(tiny), "--map-correct",
            "--group-col", "QuestionId"]
    args = train.parse_args(base)
    rows = train.load_rows(args)
    task = train.split_rows(args, rows)
    answered = train.answer_rows(args, rows, task)
    val_questions = {rows.rows[i]["QuestionId"] for i in task.va.tolist()}
    assert val_questions and not val_questions & set(answered.correct_answers)
    # grouped: no validation question is in training, so none of its rows is told its answer
    assert all(answered.texts[i].endswith("no") for i in task.va.tolist())
    args = train.parse_args(base + ["--folds", "3"])
    task = train.split_rows(args, rows)
    answered = train.answer_rows(args, rows, task)
    n = len(rows.rows)
    assert len(answered.texts) == 2 * 3 * n  # grouped and stratified folds, a set of texts each
    fold = data.kfold(rows.truth, 3, task.groups, 0)
    assert all(answered.texts[k * n + i].endswith("no") for k in range(3) for i in range(n)
               if fold[i] == k)


def test_evaluation_counts_the_rows_with_no_known_answer(tmp_path, run, capsys):
    train.main(train.parse_args(run + ["--map-correct", "--group-col", "QuestionId"]),
               log=lambda _: None)
    evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "out"), "--data",
                                       str(tmp_path / "train.csv"), "--cache-dir",
                                       str(tmp_path / "cache"), "--quiet"]))
    answers = load_checkpoint(tmp_path / "out")[1]["embedding"]["correct_answers"]
    rows = read_csv(tmp_path / "train.csv")[1]
    unknown = [r for r in rows if r["QuestionId"] not in answers]
    assert unknown and (f"{len(unknown)} rows ({len({r['QuestionId'] for r in unknown})} "
                        f"questions) have no known correct answer") in capsys.readouterr().out


def test_a_repeated_column_name_is_refused(tmp_path, run):
    with open(tmp_path / "dup.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row_id", "QuestionText", "MC_Answer", "StudentExplanation", "Category",
                    "Misconception", "StudentExplanation"])
        w.writerow([1, "q", "a", "because", "True_Correct", "NA", ""])
    message = cli_error(train, replaced(run, "--data", str(tmp_path / "dup.csv")))
    assert message.endswith("the header names column(s) ['StudentExplanation'] more than once")


def test_a_diverged_head_stops_training_naming_the_epoch_and_is_never_saved(tmp_path, run):
    message = cli_error(train, run + ["--lr", "1e4", "--epochs", "30"])
    assert "epoch " in message and "became NaN or Inf" in message
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- every flag, before the work

@pytest.mark.parametrize("flags, said", [
    (["--val-frac", "0.99"], "--val-frac 0.99: leaves no row for training"),
    (["--head-device", "cuda:7"], "--head-device: device cuda:7 asked for"),
    (["--seed", "99999999999999999999"], "--seed must be between"),
    (["--hidden", "200000", "200000"], "--hidden 200000 200000: training this head takes about"),
])
def test_flags_that_would_fail_after_the_embedding_fail_before_it(run, flags, said, monkeypatch):
    if flags[0] == "--head-device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the device exists")
    argv = [a for a in run if a not in ("--hidden", "8")] if "--hidden" in flags else run
    calls = count_forward_passes(monkeypatch)
    assert said in cli_error(train, argv + flags)
    assert not calls


def test_a_cache_spec_file_with_a_key_no_version_wrote_is_refused(tmp_path, run):
    train.main(train.parse_args(run), log=lambda _: None)
    (spec_file,) = (tmp_path / "cache").glob("*/spec.json")
    spec_file.write_text(json.dumps({**json.loads(spec_file.read_text()), "temperature": 0.5}))
    assert "records ['temperature'], which this version" in cli_error(train, run)


def test_a_long_embedding_says_how_far_it_got_once_per_interval_under_quiet(tmp_path, tiny,
                                                                             monkeypatch):
    """--quiet draws no bar: a phase over HEARTBEAT_SECONDS still says n of N, once per interval
    (the interval is read when the phase starts, so this patch is not in vain)."""
    monkeypatch.setattr(embed_cache, "HEARTBEAT_SECONDS", 0.2)
    slow = embed_cache.Embedder.stream

    def stream(self, *a, **k):  # a slow machine: 0.1 s a batch
        for batch in slow(self, *a, **k):
            time.sleep(0.1)
            yield batch
    monkeypatch.setattr(embed_cache.Embedder, "stream", stream)
    said = []
    t0 = time.monotonic()
    embed_cache.embed([f"text {i}" for i in range(40)], str(tiny), cache_dir=tmp_path, batch_size=4,
                      progress=False, log=said.append, device="cpu", dtype="float32")
    beats = [int(line.split()[1]) for line in said
             if line.startswith("embedding: ") and " of 40 texts after " in line]
    assert 2 <= len(beats) <= (time.monotonic() - t0) / 0.2 + 1
    assert beats == sorted(beats) and 0 < beats[-1] <= 40  # n of N, as far as it got


def test_random_checkpoint_writes_only_into_a_new_folder_or_its_own(tmp_path):
    """The README's first command, run by a careless user on a folder of their own files."""
    tool = [sys.executable, str(ROOT / "tools" / "random_checkpoint.py")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my config")
    (mine / "notes.txt").write_text("my notes")
    done = subprocess.run(tool + [str(mine)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().endswith(
        "holds ['notes.txt'] that this tool did not write; name a new folder")
    assert (mine / "config.json").read_text() == "my config"
    for _ in range(2):  # a new folder, then its own: written again
        assert subprocess.run(tool + [str(tmp_path / "model")], capture_output=True).returncode == 0



def test_vectors_too_big_for_the_ram_once_loaded_stop_before_any_work(run, monkeypatch):
    def ram():  # 1 kB when the loaded vectors are weighed; plenty for the model and the head
        return 1000 if sys._getframe(1).f_code.co_name == "say_size" else 10**12
    monkeypatch.setattr(embed_cache.runtime, "host_available", ram)
    calls = count_forward_passes(monkeypatch)
    message = cli_error(train, run)
    assert message.endswith("of RAM once loaded and this machine has 0.0 MB available; embed fewer "
                            "texts (or --dim)") and "48 texts x 64 need 0.0 MB" in message
    assert not calls
