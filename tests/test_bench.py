"""bench.py runs end to end (a smoke run: no timing is asserted, timings belong in its output)."""

import subprocess
import sys
from pathlib import Path


def test_bench_smoke_run():
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, str(root / "bench.py"), "--shape", "tiny", "--texts", "24", "--batch-size",
                          "8", "--budgets", "64", "--no-compiled-variants", "--device", "cpu", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("method")[1].split("\n\n")[0].splitlines()[1:]
    names = [line.split("  ")[0] for line in table if line.strip()]
    assert names == ["ours, defaults", "ours 64 tok", "transformers (naive)", "sentence-transformers bs=8"]
    for line in table:
        assert float(line.split()[-3]) < 1e-5  # the same vectors as ours
    assert "ours at defaults:" in out.stdout


def test_bench_head_smoke_run():
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, str(root / "bench.py"), "--head", "--head-rows", "300", "--head-dim", "32",
                          "--head-classes", "4", "--head-folds", "2", "--head-epochs", "2", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "head: 300 x 32 vectors, 4 classes, 2 folds x 2 epochs on cpu:" in out.stdout
