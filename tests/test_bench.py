"""bench.py runs end to end (a smoke run: no timing is asserted, timings belong in its output)."""

import subprocess
import sys
from pathlib import Path

import pytest


def bench(*flags):
    """bench.py's stdout, on the CPU; a failed run fails the test with its stderr."""
    out = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "tools" / "bench.py"), "--device", "cpu", *flags],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_bench_smoke_run():
    out = bench("--shape", "tiny", "--texts", "24", "--batch-size", "8", "--budgets", "64", "--no-compiled-variants",
                "--dtype", "float32")
    table = out.split("method")[1].split("\n\n")[0].splitlines()[1:]
    names = [line.split("  ")[0] for line in table if line.strip()]
    assert names == ["ours, defaults", "ours 64 tok", "ours int8 64 tok", "ours int4 64 tok",
                     "transformers (naive)", "sentence-transformers bs=8"]
    for line in table:
        if "int8" in line:
            assert float(line.split()[-2]) >= 0.999  # int8 weights: the same vectors to cosine 0.999
        elif "int4" in line:
            assert 0.8 <= float(line.split()[-2]) < 0.9999  # int4: near, not equal (tests/test_weights.py)
        else:
            assert float(line.split()[-3]) < 1e-5  # the same vectors as ours
    assert "ours at defaults:" in out and "int8 weights: " in out and "int4 weights: " in out


def test_bench_head_smoke_run():
    out = bench("--head", "--head-rows", "300", "--head-dim", "32", "--head-classes", "4", "--head-folds", "2",
                "--head-epochs", "2")
    assert "head: 300 x 32 vectors, 4 classes, 2 folds x 2 epochs on cpu:" in out
