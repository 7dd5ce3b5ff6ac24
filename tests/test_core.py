"""The core reads and runs alone: qwen_embed.py copied into an empty folder embeds as transformers
does and as the product's own path does; the core imports no add-on."""

import ast
import json
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F
import transformers

from at_scale import embed_cache
from helpers import ROOT, TEXTS

CORE = ["qwen_embed.py", "mlp_head.py"]
PROGRAMS = {"train", "evaluate", "research", "fit", "cli"}


def imports(file):
    """Every module a file imports, anywhere in it (inside functions too), by its top name."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / file).read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module.split(".")[0])
    return found


def test_the_core_imports_no_add_on_and_the_add_ons_no_program():
    project = ({f.stem for f in ROOT.glob("*.py")} | {"at_scale", "tools"})
    assert not imports("qwen_embed.py") & project  # nothing of the project, not even in a function
    assert imports("mlp_head.py") & project == {"data"}  # its atomic write, nothing else
    for file in ROOT.glob("at_scale/*.py"):
        assert not imports(file.relative_to(ROOT)) & PROGRAMS, file.name


def run_alone(folder, code):
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                          timeout=300, env={"PATH": "", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_qwen_embed_alone_in_an_empty_folder_equals_transformers_and_the_product(tmp_path, tiny):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "qwen_embed.py", alone)
    out = tmp_path / "vectors.json"
    run_alone(alone, f"import sys; assert sys.path[0] == '' and len(__import__('os').listdir()) == 1\n"
                     f"from qwen_embed import Qwen3Embedder\n"
                     f"m = Qwen3Embedder.from_pretrained({str(tiny)!r}, device='cpu', dtype='float32')\n"
                     f"import json; json.dump(m.encode({TEXTS!r}, progress=False).tolist(), "
                     f"open({str(out)!r}, 'w'))")
    ours = torch.tensor(json.loads(out.read_text()))
    # transformers' recipe: left padding, the last token's state, L2
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    ref = transformers.AutoModel.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        batch = tok(TEXTS, padding=True, return_tensors="pt")
        want = F.normalize(ref(**batch).last_hidden_state[:, -1], dim=-1)
    assert (ours - want).abs().max() < 1e-5
    # the product's own path: the add-ons' loader (weights as shipped), the runner, the cache
    product = embed_cache.embed(TEXTS, str(tiny), cache_dir=tmp_path / "cache", device="cpu",
                                dtype="float32", progress=False, log=lambda _: None)[None]
    assert (ours - product).abs().max() < 1e-5


def test_python_qwen_embed_prints_the_shape_and_the_cosines(tmp_path, tiny):
    shutil.copy(ROOT / "qwen_embed.py", tmp_path)
    done = subprocess.run([sys.executable, "qwen_embed.py", str(tiny), "one third", "a third",
                           "the decimal point"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "vectors: (3, 64) float32" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) == 3 and rows[0].split()[1] == "1.000"  # a vector with itself
    bad = subprocess.run([sys.executable, "-c", "from qwen_embed import Qwen3Embedder; "
                          f"Qwen3Embedder.from_pretrained({str(tiny)!r}, dtype='float16')"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert "float16 overflows" in bad.stderr.strip().splitlines()[-1]
    usage = subprocess.run([sys.executable, "qwen_embed.py"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert usage.returncode != 0 and usage.stderr.startswith("usage:")
