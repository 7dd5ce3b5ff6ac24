"""torchrun: 2 CPU processes (gloo) give the single-process vectors and metrics; a killed rank resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from at_scale import embed_cache
import evaluate
import train
from data import read_csv, render
from helpers import PINNED, ROOT, cached_keys, cli_error, write_csv


def torchrun(args, nproc=2, script="train.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script)] + args
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def vectors(data, tiny, cache):
    texts = render(train.MAP_TEMPLATE, read_csv(data)[1])
    logs = []
    out = embed_cache.embed(texts, str(tiny), max_length=512, cache_dir=cache, progress=False, log=logs.append,
                            device="cpu", dtype="float32")
    return out[None], logs


def test_two_processes_equal_one(tmp_path, tiny):
    data = write_csv(tmp_path / "train.csv", n=200)
    args = ["--data", str(data), "--model", str(tiny), *PINNED, "--epochs", "3", "--hidden", "16", "8", "--quiet",
            "--cache-chunk", "30"]
    proc = torchrun(args + ["--cache-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "two")])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.count(" rows, 4 labels") == 1  # rank 0 alone logs
    assert re.search(r"rank 0: \d+ texts, \d+ tokens", out) and re.search(r"rank 1: \d+ texts, \d+ tokens", out)
    train.main(train.parse_args(args + ["--cache-dir", str(tmp_path / "c1"), "--out", str(tmp_path / "one")]),
               log=lambda *_: None)
    two, logs = vectors(data, tiny, tmp_path / "c2")
    assert "no forward pass" in logs[0]  # every text was cached by one of the two ranks
    one, _ = vectors(data, tiny, tmp_path / "c1")
    assert (two - one).abs().max().item() <= 1e-5
    meta_two = json.loads((tmp_path / "two" / "meta.json").read_text())
    meta_one = json.loads((tmp_path / "one" / "meta.json").read_text())
    for key in ("val_map3", "val_acc", "val_loss", "best_epoch"):
        assert meta_two[key] == pytest.approx(meta_one[key], abs=1e-6), key

    # evaluate.py under torchrun: the ranks embed the new texts, rank 0 writes the same submission.
    test = write_csv(tmp_path / "test.csv", n=60, seed=7)
    ev = ["--checkpoint", str(tmp_path / "one"), "--data", str(test), "--quiet", "--cache-chunk", "10"]
    proc = torchrun(ev + ["--cache-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "sub2.csv")],
                    script="evaluate.py")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.count("MAP@3") == 1
    evaluate.main(evaluate.parse_args(ev + ["--cache-dir", str(tmp_path / "c1"), "--out", str(tmp_path / "sub1.csv")]))
    assert (tmp_path / "sub2.csv").read_text() == (tmp_path / "sub1.csv").read_text()


def test_killed_rank_leaves_complete_chunks_and_resumes(tmp_path, tiny):
    data = write_csv(tmp_path / "big.csv", n=3000)
    cache = tmp_path / "cache"
    args = ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(cache), "--cache-chunk", "50",
            "--epochs", "1", "--hidden", "8", "8", "--quiet"]
    proc = torchrun(args)
    deadline = time.time() + 120
    while len(list(cache.glob("*/chunk-*.safetensors"))) < 4:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun stops the other rank and fails
    done = cached_keys(cache)  # what the ranks had saved when one was killed
    distinct = len(set(render(train.MAP_TEMPLATE, read_csv(data)[1])))
    assert 0 < len(done) < distinct

    proc = torchrun(args)  # rerun with any number of processes: only what is missing is computed
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    cached, computed = map(int, re.search(r"(\d+) cached, computing (\d+)", out).groups())
    assert computed == distinct - len(done)
    resumed, _ = vectors(data, tiny, cache)
    fresh, _ = vectors(data, tiny, tmp_path / "fresh")
    assert torch.allclose(resumed, fresh, atol=1e-5)


def test_more_ranks_on_a_node_than_gpus_stops_before_any_work(tmp_path, tiny, monkeypatch):
    """torchrun --nproc_per_node=2 on a 1-GPU node: one line, not 'invalid device ordinal' from a rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *_: pytest.fail("set_device before the check"))
    data = write_csv(tmp_path / "train.csv")
    message = cli_error(train, ["--data", str(data), "--model", str(tiny), "--device", "cuda", "--quiet",
                                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert "2 processes on this node but 1 GPU(s): use --nproc_per_node=1 or fewer, or --device cpu" in message
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
