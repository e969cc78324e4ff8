"""``compare``: two real quickstart runs side by side (differing hyperparameters, final and best metrics, wall
time, checkpoint; comparison.md/.csv and the overlaid plot), globs, ``latest`` pointers and clear errors."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from fault_helpers import cli
from helpers import FAST, REPO, read_metrics, run_cli
from tl_lightning import compare
from tl_lightning.errors import TLError

QUICK = ("--config", str(REPO / "configs/quickstart.yaml"), "--data.image_size=32", "--trainer.max_epochs=2",
         "--model.embedding=pooled", *FAST)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    run_cli("fit", *QUICK, "--model.lr=0.01", f"--trainer.default_root_dir={root / 'lr-high'}")
    run_cli("fit", *QUICK, "--model.lr=0.0003", f"--trainer.default_root_dir={root / 'lr-low'}")
    (root / "notes.txt").write_text("not a run")
    return root


def test_compare_two_real_runs_writes_table_csv_and_plot(two_runs, tmp_path):
    out = tmp_path / "cmp"
    proc = cli("compare", two_runs / "lr-high", two_runs / "lr-low", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out / "comparison.csv") as f:
        header, *rows = list(csv.reader(f))
    # the only hyperparameter that differs is the learning rate (the run folder itself does not count)
    params = header[1:header.index("test/acc")]
    assert params == ["model.init_args.lr"]
    assert [r[0] for r in rows] == ["lr-high", "lr-low"]
    assert [float(r[1]) for r in rows] == [0.01, 0.0003]
    for row, name in zip(rows, ("lr-high", "lr-low")):
        m = read_metrics(two_runs / name)
        cells = dict(zip(header, row))
        assert float(cells["test/acc"]) == pytest.approx(m["metrics"]["test/acc"], abs=5e-5)
        best = max(m["history"], key=lambda h: h["val/acc"])
        assert cells["best val/acc (epoch)"] == f"{best['val/acc']:.4f} ({best['epoch']})"
        lowest = min(m["history"], key=lambda h: h["val/loss"])
        assert cells["best val/loss (epoch)"] == f"{lowest['val/loss']:.4f} ({lowest['epoch']})"
        assert float(cells["wall time (s)"]) == pytest.approx(m["wall_time_s"], abs=0.05)
        assert cells["checkpoint"] == m["best_checkpoint"] and Path(cells["checkpoint"]).is_file()
        assert cells["epochs"] == str(m["epochs"])
    md = (out / "comparison.md").read_text()
    assert "| lr-high | 0.01 |" in md and "| lr-low | 0.0003 |" in md
    assert "| lr-high | 0.01 |" in proc.stdout  # the table is printed too
    png = (out / "comparison_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # atomic writes leave no temporaries


def test_glob_skips_non_runs_and_defaults_out_to_the_runs_parent(two_runs):
    result = compare.compare([str(two_runs / "*")])
    assert [r[0] for r in result["rows"]] == ["lr-high", "lr-low"]
    assert Path(result["md"]) == two_runs / "comparison.md" and Path(result["csv"]).is_file()


def _fake_run(folder: Path, lr: float, history: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"trainer:\n  default_root_dir: {folder}\n  max_epochs: 2\n"
                                        f"model:\n  init_args:\n    lr: {lr}\n    tags: [a, b]\n")
    (folder / "metrics.json").write_text(json.dumps({
        "command": "fit", "metrics": {"val/acc": history[-1]["val/acc"]}, "best_checkpoint": None,
        "wall_time_s": 1.5, "epochs": len(history), "history": history}))
    return folder


def test_latest_pointer_stands_for_its_run_and_identical_keys_are_left_out(tmp_path):
    first = _fake_run(tmp_path / "exp" / "20260101-000000", 0.1, [{"epoch": 0, "val/acc": 0.5}, {"epoch": 1, "val/acc": 0.4}])
    _fake_run(tmp_path / "other", 0.2, [{"epoch": 0, "val/acc": 0.7}])
    os.symlink(first.name, tmp_path / "exp" / "latest")
    result = compare.compare([str(tmp_path / "exp"), str(tmp_path / "other"), str(first)], out=str(tmp_path / "o"))
    assert len(result["rows"]) == 2  # exp (via latest) and first are the same run: listed once
    header = result["header"]
    assert header[1:2] == ["model.init_args.lr"] and "model.init_args.tags" not in header
    cells = dict(zip(header, result["rows"][0]))
    assert cells["best val/acc (epoch)"] == "0.5000 (0)"  # the best epoch, not the last one
    assert cells["val/acc"] == "0.4000"


def test_bad_input_is_one_clear_sentence(tmp_path):
    with pytest.raises(TLError, match="does not exist"):
        compare.compare([str(tmp_path / "missing")])
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(TLError, match="has no metrics.json"):
        compare.compare([str(tmp_path / "unfinished")])
    with pytest.raises(TLError, match="no finished run .* matches"):
        compare.compare([str(tmp_path / "unf*")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text('{"metrics": {"val/acc": 0.5')
    with pytest.raises(TLError, match="is not valid JSON"):
        compare.compare([str(broken)], out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # nothing half-written
