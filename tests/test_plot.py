"""plot.py draws what runs keep: learning curves (folds thin, their mean thick), the layer sweep,
the head sweep, several runs overlaid. Checked through matplotlib's own objects, not only files."""

import subprocess
import sys

import pytest

from tools import plot
import train
from helpers import ROOT, without, write_csv


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("runs")
    data = write_csv(root / "train.csv")
    base = ["--data", str(data), "--model", str(tiny), "--cache-dir", str(root / "cache"), "--epochs", "3",
            "--hidden", "16", "8", "--quiet", "--device", "cpu", "--dtype", "float32"]
    for name, flags in (("one", []), ("other", ["--lr", "3e-3"]), ("folds", ["--folds", "3"]),
                        ("layers", ["--layer-sweep", "--compare-pooling"]), ("sweep", ["--sweep", "4"])):
        argv = without(base, "--epochs", "--hidden") if name == "sweep" else base
        train.main(train.parse_args(argv + flags + ["--out", str(root / name)]), log=lambda *_: None)
    return root


def draw(runs, tmp_path, names, *flags, out="fig.png"):
    fig = plot.main(plot.parse_args([str(runs / n) for n in names] + ["--out", str(tmp_path / out), *flags]))
    assert (tmp_path / out).stat().st_size > 1000
    return fig


def test_learning_curves_overlay_runs(runs, tmp_path):
    fig = draw(runs, tmp_path, ["one", "other"])
    score, loss = fig.axes
    assert [line.get_label() for line in score.get_lines()] == ["one", "other"]
    assert len(score.get_lines()[0].get_xdata()) == 3  # an epoch a point
    assert len(loss.get_lines()) == 4  # training and validation loss of each run
    assert score.get_xlabel() == "epoch" and score.get_ylabel() == "validation MAP@3"
    assert loss.get_ylabel() == "cross-entropy (nats)"
    assert fig._suptitle.get_text() == "tiny0, train.csv, 0.2 held out, stratified"


def test_folds_are_thin_lines_with_their_mean(runs, tmp_path):
    fig = draw(runs, tmp_path, ["folds"], out="folds.svg")
    score = fig.axes[0]
    widths = sorted(line.get_linewidth() for line in score.get_lines())
    assert widths == [0.8, 0.8, 0.8, 2]  # 3 folds and their mean
    assert [t.get_text() for t in score.get_legend().get_texts()] == ["folds (mean of 3)"]
    assert "3-fold CV" in fig._suptitle.get_text()


def test_layer_sweep_one_line_per_pooling_with_the_final_output_marked(runs, tmp_path):
    fig = draw(runs, tmp_path, ["layers"], out="layers.pdf")
    (axis,) = fig.axes
    curves = [line for line in axis.get_lines() if line.get_marker() == "o"]
    stars = [line for line in axis.get_lines() if line.get_marker() == "*"]
    assert [line.get_label() for line in curves] == ["last pooling", "mean pooling"]
    assert all(list(line.get_xdata()) == [0, 1, 2, 3] for line in curves)  # the tiny model's 3 layers and embeddings
    assert len(stars) == 2 and axis.get_xlabel() == "layer (0 = token embeddings)"


def test_sweep_one_panel_per_hyperparameter(runs, tmp_path):
    fig = draw(runs, tmp_path, ["sweep"])
    assert [axis.get_xlabel() for axis in fig.axes] == [label for _, label, _ in plot.SWEPT]
    assert all(len(axis.collections[0].get_offsets()) == 4 for axis in fig.axes)  # the 4 trials
    assert fig.axes[0].get_xscale() == "log"


def test_errors_are_one_line(runs, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--kind layers needs layer_sweep.csv, which one lacks"):
        draw(runs, tmp_path, ["one"], "--kind", "layers")
    with pytest.raises(FileNotFoundError, match="no history.csv"):
        plot.read_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ValueError, match=r"^plot.py needs matplotlib: pip install matplotlib$"):
        draw(runs, tmp_path, ["one"])
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plot.py"), str(tmp_path / "none"), "--out", "x.png"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().startswith("error: ") and "\n" not in out.stderr.strip()


@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_a_figure_replaces_only_a_figure_plot_drew(runs, tmp_path, suffix):
    draw(runs, tmp_path, ["one"], out=f"fig.{suffix}")
    draw(runs, tmp_path, ["other"], out=f"fig.{suffix}")  # its own figure: redrawn in place
    (tmp_path / f"mine.{suffix}").write_bytes(b"a figure someone else made")
    with pytest.raises(ValueError, match="is a file this program did not write"):
        draw(runs, tmp_path, ["one"], out=f"mine.{suffix}")
    assert (tmp_path / f"mine.{suffix}").read_bytes() == b"a figure someone else made"


def test_a_study_by_trial_with_its_importances(runs, tmp_path):
    fig = draw(runs, tmp_path, ["sweep"], "--kind", "study")
    by_trial, importance = fig.axes
    assert len(by_trial.collections[0].get_offsets()) >= 1  # the scored trials
    assert len(importance.patches) == len(plot.read_run(runs / "sweep")["tables"]["importances.csv"])
