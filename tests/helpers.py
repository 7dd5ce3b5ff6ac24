"""What several test modules share: pinned flags, a CSV writer, a one-line-error runner, counters."""

import argparse
import csv
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli
from qwen_embed import Qwen3Model

ROOT = Path(__file__).parent.parent
PINNED_KW = dict(device="cpu", dtype="float32")  # exact comparisons, on any machine
PINNED = ["--device", "cpu", "--dtype", "float32"]
TEXTS = [
    "What fraction of the shape is not shaded?",
    "a",
    "One third is equal to three ninths because 6 over 9 is 2 thirds, so 1/3 is not shaded at all.",
    "Ünïcödé 日本語 🙂\nnew line, \"quotes\"",
    "12345",
    "I think the answer is 1/3 because you divide 9 by 3 and get 3. " * 4,
]
WORDS = ["half", "quarter", "third", "add", "tops", "bottoms", "bigger", "decimal", "longer", "because"]


def write_csv(path, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = ["True_Correct:NA", "False_Misconception:Additive", "True_Neither:NA", "False_Neither:NA"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row_id", "QuestionId", "QuestionText", "MC_Answer", "StudentExplanation", "Category", "Misconception"])
        for i in range(n):
            words = [WORDS[j] for j in torch.randint(len(WORDS), (int(torch.randint(1, 12, ())),), generator=g)]
            cat, mis = labels[i % 4].split(":")
            w.writerow([i, 100 + i % 6, f"Question {i % 6}, with a comma?", r"\( \frac{1}{3} \)",
                        " ".join(words) + ("\nsecond line" if i % 5 == 0 else ""), cat, mis])
    return path


def without(argv, *flags):
    """argv without these flags and their values (a sweep draws --epochs and --hidden itself, and
    refuses them given)."""
    out, skipping = [], False
    for word in argv:
        skipping = word in flags or (skipping and not word.startswith("--"))
        if not skipping:
            out.append(word)
    return out


def cli_error(script, argv):
    """Run a script's command line in-process; return its one-line error (and check it is one)."""
    with pytest.raises(SystemExit) as e:
        cli.cli(script.main, script.parse_args, argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def count_forward_passes(monkeypatch):
    calls = []
    original = Qwen3Model.forward
    monkeypatch.setattr(Qwen3Model, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def embedded(log):
    """(cached, computed) from embed_cache's log line."""
    m = re.search(r"(\d+) cached, computing (\d+)", log)
    return (int(m[1]), int(m[2])) if m else None


def cached_keys(cache):
    """The distinct text keys in a cache folder's chunk files."""
    return {bytes(k) for f in cache.glob("*/chunk-*.safetensors") for k in load_file(f)["keys"].numpy()}


def parser_actions(parse_args, argv):
    """{flag: argparse action} of the parser that a script's parse_args builds (--help left out)."""
    found = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        found.update({x.option_strings[0]: x for x in self._actions
                      if x.option_strings and x.option_strings[0] != "-h"})
        return original(self, *a, **k)
    argparse.ArgumentParser.parse_args = grab
    try:
        parse_args(argv)
    finally:
        argparse.ArgumentParser.parse_args = original
    return found
