"""What a researcher who changes the code can rely on: vectors cached by other code are never used,
evaluation embeds exactly as training did, heads load by name, and every numeric flag is checked
before any forward pass."""

import csv
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from at_scale import embed_cache, fingerprint
import evaluate
import train
from helpers import PINNED, ROOT, cli_error, count_forward_passes, parser_actions, write_csv
from mlp_head import load_checkpoint
from qwen_embed import POOLINGS, pool


# ----------------------------------------------------------------------------- vectors follow the code

@pytest.fixture()
def source(tmp_path):
    """A copy of the product's source tree, for a researcher's edits."""
    src = tmp_path / "src"
    for file in [*ROOT.glob("*.py"), *ROOT.glob("at_scale/*.py"), *ROOT.glob("tools/*.py")]:
        (src / file.parent.relative_to(ROOT)).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, src / file.relative_to(ROOT))
    return src


def edit(src, file, old, new):
    text = (src / file).read_text()
    assert text.count(old) == 1, old
    (src / file).write_text(text.replace(old, new))


def train_in(src, tmp_path, tiny):
    """train.py of the copy, on the tiny checkpoint, one cache for all runs -> what it said."""
    if not (tmp_path / "train.csv").exists():  # once: write_csv draws from torch's global RNG too
        write_csv(tmp_path / "train.csv", n=12)
    argv = ["--data", str(tmp_path / "train.csv"), "--model", str(tiny), *PINNED,
            "--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--hidden", "8", "8", "--quiet"]
    done = subprocess.run([sys.executable, "train.py", *argv], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def fingerprint_in(src):
    done = subprocess.run([sys.executable, "-c", "from at_scale import fingerprint; import json; "
                           "print(json.dumps(fingerprint.code_fingerprint()))"],
                          cwd=src, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


NORM = "h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)"


def test_an_edit_to_the_math_recomputes_and_says_so_a_comment_or_docstring_does_not(source, tmp_path,
                                                                                     tiny):
    said = train_in(source, tmp_path, tiny)
    assert "computing 12" in said
    # a comment, a docstring and reformatting: the same code, the cached vectors are used
    edit(source, "qwen_embed.py", NORM, NORM + "  # a researcher's note")
    edit(source, "qwen_embed.py", '"""cos, sin of shape', '"""Angles: cos, sin of shape')
    edit(source, "qwen_embed.py", "x = x + self.mlp(self.post_attention_layernorm(x))",
         "x = x + self.mlp(\n            self.post_attention_layernorm(x))")
    said = train_in(source, tmp_path, tiny)
    assert "all 12 vectors found in the cache, no forward pass" in said, said
    assert "changed" not in said
    # the math: every vector is computed afresh, and the changed function is named
    edit(source, "qwen_embed.py", NORM, NORM.replace("self.eps)", "2 * self.eps)"))
    said = train_in(source, tmp_path, tiny)
    assert ("the code that computes these vectors changed since they were cached "
            "(RMSNorm.forward): computing afresh") in said
    assert "0 cached, computing 12" in said
    # back to the code of the first run: its vectors were kept on disk, and are used again
    edit(source, "qwen_embed.py", NORM.replace("self.eps)", "2 * self.eps)"), NORM)
    said = train_in(source, tmp_path, tiny)
    assert "all 12 vectors found in the cache, no forward pass" in said


def embed_in(src, tmp_path, tiny):
    """The copy's embed_cache on the tiny checkpoint, one cache for every run -> what it said."""
    code = ("from at_scale import embed_cache\n"
            f"embed_cache.embed(['one third', 'a half'], {str(tiny)!r}, cache_dir="
            f"{str(tmp_path / 'cache')!r}, device='cpu', dtype='float32', progress=False)")
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return "reused" if "no forward pass" in done.stdout else "computed"


# (file, old, new, what the next run does): a researcher's edits, one after another on one copy.
# The fingerprint is found from the code, so none of them names a function by hand.
EDITS = [
    # a new helper called from the path: the call is seen, then every later edit of its body
    ("qwen_embed.py", "    return F.normalize(v, dim=-1) if normalize else v\n",
     "    return unit(v) if normalize else v\n\n\ndef unit(v):\n    return F.normalize(v, dim=-1)\n",
     "computed"),
    ("qwen_embed.py", "    return F.normalize(v, dim=-1)\n", "    return F.normalize(v, dim=-1, eps=1e-9)\n",
     "computed"),
    # a module constant used in the math, then only its value
    ("qwen_embed.py", "# ------------------------------------------------------------------------------------------- config",
     "GAIN = 1.0\n\n# config", "reused"),  # defined, used by nothing yet
    ("qwen_embed.py", "        return self.weight * h.to(x.dtype)", "        return self.weight * h.to(x.dtype) * GAIN",
     "computed"),
    ("qwen_embed.py", "GAIN = 1.0", "GAIN = 1.5", "computed"),
    # the config parsing
    ("qwen_embed.py", '        cfg.setdefault("rope_theta", rope.get("rope_theta"))',
     '        cfg.setdefault("rope_theta", rope.get("rope_theta") or 10000.0)', "computed"),
    # a changed default argument
    ("qwen_embed.py", "def rope(positions, head_dim, theta, dtype):", "def rope(positions, head_dim, theta, dtype=None):",
     "computed"),
    # what cannot change a vector: the text of an error, a log line, the command line, Hub resolution
    ("qwen_embed.py", '"texts must be a list of strings"', '"texts: give a list of str"', "reused"),
    ("qwen_embed.py", "    model.load_state_dict(state, strict=True, assign=True)",
     '    print("weights loaded")\n    model.load_state_dict(state, strict=True, assign=True)', "reused"),
    ("qwen_embed.py", 'print("weights loaded")', 'print(f"{len(state)} tensors loaded")', "reused"),
    ("qwen_embed.py", 'print("cosine similarities:")', 'print("cosines:")', "reused"),
    ("qwen_embed.py", 'allow_patterns=["*.json", "*.safetensors", "*.txt"]',
     'allow_patterns=["*.json", "*.safetensors"]', "reused"),
]


@pytest.mark.slow
def test_vectors_follow_every_edit_to_the_code_they_reach_and_no_other(source, tmp_path, tiny):
    """Each class of edit, through the real cache: recomputed where it reaches a vector, reused
    where it cannot change one."""
    assert embed_in(source, tmp_path, tiny) == "computed"
    assert embed_in(source, tmp_path, tiny) == "reused"
    for file, old, new, expected in EDITS:
        edit(source, file, old, new)
        assert embed_in(source, tmp_path, tiny) == expected, (file, new)


def test_a_new_module_on_the_path_and_a_moved_definition(source, tmp_path, tiny):
    """apply_rope moved to a new module that qwen_embed imports: the fingerprint is the same (a
    definition is keyed by its name, not its file), and an edit in the new module is followed."""
    before = fingerprint_in(source)
    text = (source / "qwen_embed.py").read_text()
    start = text.index("def apply_rope(")
    end = text.index("\n\n\n", start) + 3
    (source / "rope_math.py").write_text("import torch\n\n\n" + text[start:end])
    (source / "qwen_embed.py").write_text((text[:start] + text[end:]).replace(
        "from torch import nn\n", "from torch import nn\n\nfrom rope_math import apply_rope\n", 1))
    assert fingerprint_in(source) == before
    assert embed_in(source, tmp_path, tiny) == "computed"  # the first run of this cache
    edit(source, "rope_math.py", "x * cos[:, None]", "x * cos[:, None] * 1.0")
    after = fingerprint_in(source)
    assert [n for n in after[1] if before[1].get(n) != after[1][n]] == ["apply_rope"]
    assert embed_in(source, tmp_path, tiny) == "computed"


def test_the_entry_points_and_the_boundary_are_defined_and_reached():
    """The only names written by hand: each entry point is a definition the walk starts from, the
    boundary one it reaches and stops at (Hub resolution: where files come from, not what they
    hold); a name that is gone is an error, never a silently smaller fingerprint."""
    functions = fingerprint.code_fingerprint()[1]
    for name in fingerprint.ENTRY_POINTS:
        fingerprint.reach((name,), ())  # defined
        assert name.rpartition(".")[2] in functions, name
    assert fingerprint.reach(("qwen_embed.Qwen3Embedder.from_pretrained",), ()) >= {
        ("qwen_embed", "resolve_model_dir")}  # reached without the boundary ...
    assert "resolve_model_dir" not in functions  # ... and stopped at with it
    for gone in (("qwen_embed.NoSuch",), ("at_scale.weights.nothing",)):
        with pytest.raises(RuntimeError, match="defined nowhere"):
            fingerprint.reach(gone, ())


@pytest.mark.parametrize("metadata", [None, {"code": "5d7f8f6d43b784b9", "functions": "{}"}])
def test_a_cache_from_before_fingerprints_is_used_with_one_note(tmp_path, tiny, monkeypatch, metadata):
    """Chunks written before any fingerprint (no metadata) and by the hand-listed fingerprint of
    before (its "code" key) are used as they are, with one note."""
    texts = [f"text number {i}" for i in range(5)]
    kw = dict(cache_dir=tmp_path, progress=False, device="cpu", dtype="float32")
    first = embed_cache.embed(texts, str(tiny), log=lambda _: None, **kw)[None]
    for chunk in tmp_path.glob("*/chunk-*.safetensors"):
        with safe_open(chunk, framework="pt") as f:
            assert f.metadata()["vector_code"] == fingerprint.code_fingerprint()[0]
        save_file(load_file(chunk), str(chunk), metadata)
    calls, said = count_forward_passes(monkeypatch), []
    got = embed_cache.embed(texts, str(tiny), log=said.append, **kw)[None]
    assert not calls and torch.equal(got, first)
    notes = [line for line in said if "before the code's and the weights' fingerprints" in line]
    assert len(notes) == 1 and "used as they are" in notes[0]


# ------------------------------------------------------------------ evaluation embeds as training did

def test_per_row_instruction_evaluation_computes_the_vectors_training_cached(tmp_path, tiny):
    """A template that takes each row's instruction from a column: evaluate.py, with an empty cache
    of its own, computes exactly the vectors training cached (the same spec folder, the same vector
    for every text)."""
    data = write_csv(tmp_path / "plain.csv", n=16)
    with open(data, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["Task"] = ["Find the misconception", "Is the answer right?"][i % 2]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    template = "Instruct: {Task}\nQuery:{StudentExplanation}"
    train.main(train.parse_args(["--data", str(tmp_path / "train.csv"), "--model", str(tiny), *PINNED,
                                 "--text-template", template, "--cache-dir", str(tmp_path / "a"),
                                 "--epochs", "1", "--hidden", "8", "8", "--quiet", "--out",
                                 str(tmp_path / "run")]), log=lambda _: None)
    evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "run"), "--data",
                                       str(tmp_path / "train.csv"), "--cache-dir",
                                       str(tmp_path / "b"), "--quiet"]))

    def vectors(cache):
        (folder,) = [p.name for p in cache.iterdir() if p.is_dir()]
        found = {}
        for chunk in (cache / folder).glob("chunk-*.safetensors"):
            t = load_file(chunk)
            found.update({bytes(k): v for k, v in zip(t["keys"].numpy(), t["vectors"])})
        return folder, found

    (folder_a, trained), (folder_b, evaluated) = vectors(tmp_path / "a"), vectors(tmp_path / "b")
    assert folder_a == folder_b and len(trained) == 16 and trained.keys() == evaluated.keys()
    assert all(torch.equal(trained[k], evaluated[k]) for k in trained)


# ----------------------------------------------------------------------------- heads by name

def old_head(in_dim, n_classes, hidden, input_norm):
    """The head as saved before its layers had names: an nn.Sequential, named by position."""
    return nn.Sequential(nn.LayerNorm(in_dim) if input_norm else nn.Identity(), nn.Dropout(0.2),
                         nn.Linear(in_dim, hidden[0]), nn.GELU(), nn.Dropout(0.2),
                         nn.Linear(hidden[0], hidden[1]), nn.GELU(), nn.Dropout(0.2),
                         nn.Linear(hidden[1], n_classes))


@pytest.mark.parametrize("input_norm", [False, True])
def test_a_head_saved_by_position_loads_and_predicts_the_same(tmp_path, input_norm):
    torch.manual_seed(0)
    net = old_head(16, 5, [12, 8], input_norm).eval()
    if input_norm:  # not the identity, so that a lost LayerNorm shows
        nn.init.normal_(net[0].weight)
        nn.init.normal_(net[0].bias)
    save_file({f"net.{k}": v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "head.safetensors"))
    hparams = dict(in_dim=16, n_classes=5, hidden=[12, 8], dropout=0.2, activation="gelu",
                   input_norm=input_norm)
    (tmp_path / "meta.json").write_text(json.dumps({"labels": list("abcde"), "head": hparams,
                                                    "embedding": {}, "heads": ["head.safetensors"]}))
    (head,), _ = load_checkpoint(tmp_path)
    x = torch.randn(7, 16)
    assert torch.equal(head(x), net(x))
    assert "fc1.weight" in head.state_dict()


def test_a_head_that_does_not_match_its_meta_names_the_weights(tmp_path):
    net = old_head(16, 5, [12, 8], False)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    state["fc4.weight"] = torch.zeros(2, 2)
    del state["net.8.bias"]
    save_file(state, str(tmp_path / "head.safetensors"))
    hparams = dict(in_dim=16, n_classes=5, hidden=[12, 9], dropout=0.2, activation="gelu",
                   input_norm=False)
    (tmp_path / "meta.json").write_text(json.dumps({"labels": list("abcde"), "head": hparams,
                                                    "embedding": {}, "heads": ["head.safetensors"]}))
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path)
    message = str(e.value)
    assert "missing ['fc3.bias']" in message and "unexpected ['fc4.weight']" in message
    assert "misshapen ['fc2.bias', 'fc2.weight', 'fc3.weight']" in message and "\n" not in message


# ----------------------------------------------------------------------------- one list of poolings

def test_one_list_of_poolings_and_pool_refuses_an_unknown_name():
    assert train.parse_args([]).pooling in POOLINGS
    action = parser_actions(train.parse_args, [])["--pooling"]
    assert tuple(action.choices) == POOLINGS
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(torch.randn(5, 4), torch.tensor([2, 3]), "max")
    with pytest.raises(ValueError, match="--pooling must be one of"):
        embed_cache.EmbedSpec("m", pooling="max")


# ----------------------------------------------------------------------------- every flag checked

# Each numeric flag with an invalid range, and a value out of it; the flags with none.
BAD = {"--val-frac": "1", "--folds": "-1", "--max-length": "1", "--dim": "0", "--layer": "9",
       "--hidden": ["0", "8"], "--dropout": "1", "--epochs": "0", "--lr": "0", "--warmup-frac": "1.5",
       "--weight-decay": "-0.1", "--label-smoothing": "1.5", "--head-batch-size": "0",
       "--sweep": "-1", "--lora-rank": "-1", "--lora-alpha": "0", "--lora-layers": "0",
       "--lora-lr": "0", "--fidelity-texts": "-1", "--max-memory": "0", "--batch-size": "0",
       "--max-batch-tokens": "0", "--cache-chunk": "0", "--cache-seconds": "0"}
NO_INVALID = {"--seed"}  # any integer seeds the generators


def numeric_flags(parse_args, argv):
    return [flag for flag, a in parser_actions(parse_args, argv).items() if a.type in (int, float)]


def test_every_numeric_flag_is_listed_here():
    flags = set(numeric_flags(train.parse_args, [])) | set(
        numeric_flags(evaluate.parse_args, ["--checkpoint", "c", "--data", "d"]))
    assert flags == set(BAD) | NO_INVALID


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("flags")
    data = write_csv(tmp / "train.csv", n=16)
    argv = ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(tmp / "cache"),
            "--epochs", "1", "--hidden", "8", "8", "--quiet"]
    train.main(train.parse_args(argv + ["--out", str(tmp / "run")]), log=lambda _: None)
    return tmp, argv


@pytest.mark.parametrize("flag", sorted(BAD))
def test_an_out_of_range_flag_is_one_line_before_any_forward_pass(flag, trained, monkeypatch):
    tmp, argv = trained
    value = BAD[flag] if isinstance(BAD[flag], list) else [BAD[flag]]
    calls = count_forward_passes(monkeypatch)
    shown = " ".join(value)
    if flag in numeric_flags(train.parse_args, []):
        message = cli_error(train, argv + [flag, *value, "--cache-dir", str(tmp / "fresh")])
        assert flag in message and shown in message, message
    if flag in numeric_flags(evaluate.parse_args, ["--checkpoint", "c", "--data", "d"]):
        message = cli_error(evaluate, ["--checkpoint", str(tmp / "run"), "--data",
                                       str(tmp / "train.csv"), "--cache-dir", str(tmp / "fresh"),
                                       "--quiet", flag, *value])
        assert flag in message and shown in message, message
    assert not calls


def test_label_smoothing_reaches_the_loss():
    """Label smoothing reaches the loss: with smoothing the loss of a confident head is higher."""
    from mlp_head import head_loss
    logits, y = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([0])
    assert head_loss(logits, y, 0.3) > head_loss(logits, y, 0.0) + 0.5


def test_label_smoothing_out_of_range_says_its_range(trained):
    tmp, argv = trained
    assert re.search(r"--label-smoothing must be in \[0, 1\), got 1.5",
                     cli_error(train, argv + ["--label-smoothing", "1.5"]))
