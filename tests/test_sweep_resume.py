"""A local sweep continues where its runner was killed: killed between trials (before the next trial's first
checkpoint) and inside a trial (after its epoch-0 checkpoint). Finished trials are kept, not re-run, and feed the
engine; the killed trial resumes from last.ckpt; the leaderboard covers every trial. Kill points are handshakes
(``tests/sweep_gate.py``), not timings."""
from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from helpers.launch import Launched, launch

TESTS = Path(__file__).resolve().parent


def _sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"model.lr": {"values": [0.01, 0.003]}},
        "command": ["${env}", "python", "-m", "tl_lightning", "fit", "--config", str(REPO / "configs/quickstart.yaml"),
                    "--data.image_size=32", "--model.embedding=pooled", "--trainer.max_epochs=2",
                    "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                    "--data.num_workers=0", "--trainer.callbacks+=sweep_gate.Gate", "${args}"],
    }))
    return path


def _runner(sweep_file: Path, sweep_dir: Path, gate: dict) -> Launched:
    """The sweep runner in a session of its own (one ``killpg`` kills it and its trial)."""
    unset = [k for k in os.environ if k.startswith("TL_TEST_GATE")]
    env = dict(gate, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return launch("sweep", sweep_file, "--dir", sweep_dir, env=env, unset=unset, new_session=True)


def _kill_at_gate(proc: Launched, reached: Path) -> None:
    deadline = time.monotonic() + 900  # safety net; the handshake is the gate file
    while not reached.exists():
        assert proc.poll() is None, "".join(proc.output())[-3000:]
        assert time.monotonic() < deadline, "the trial never reached the gate"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its trial, at once
    proc.wait()


@pytest.mark.slow
def test_a_killed_sweep_continues_where_it_stopped(tmp_path):
    sweep_file, sweep_dir = _sweep_file(tmp_path), tmp_path / "sweep"
    trial0, trial1 = sweep_dir / "trial-00", sweep_dir / "trial-01"

    # 1. killed between trials: trial-00 finished, trial-01 held before its first epoch (no checkpoint yet)
    proc = _runner(sweep_file, sweep_dir, {"TL_TEST_GATE_TRIAL": "trial-01", "TL_TEST_GATE_EPOCH": "0"})
    _kill_at_gate(proc, trial1 / "gate.reached")
    state = {t["name"]: t for t in json.loads((sweep_dir / "trials.json").read_text())}
    assert state["trial-00"]["state"] == "finished" and state["trial-01"]["state"] == "running"
    assert not (trial1 / "checkpoints" / "last.ckpt").exists()
    finished0 = (trial0 / "metrics.json").stat().st_mtime_ns

    # 2. run again: trial-00 kept, trial-01 starts over; killed inside it, after its epoch-0 checkpoint
    (trial1 / "gate.reached").unlink()
    proc = _runner(sweep_file, sweep_dir, {"TL_TEST_GATE_TRIAL": "trial-01", "TL_TEST_GATE_EPOCH": "1"})
    _kill_at_gate(proc, trial1 / "gate.reached")
    assert (trial1 / "checkpoints" / "last.ckpt").is_file() and not (trial1 / "metrics.json").exists()

    # 3. run again without a gate: trial-01 resumes from last.ckpt and finishes
    proc = _runner(sweep_file, sweep_dir, {})
    out = "".join(proc.communicate(timeout=900))
    assert proc.returncode == 0, out[-3000:]
    assert "1 trial(s) done, 1 to resume" in out and f"trial-01: resuming from {trial1 / 'checkpoints' / 'last.ckpt'}" in out
    assert "trial-00: " not in out.split("to resume", 1)[1].split("leaderboard")[0].replace("trial-00 |", "")
    assert (trial0 / "metrics.json").stat().st_mtime_ns == finished0  # the finished trial was not run again
    log1 = (trial1 / "output.log").read_text()
    assert "Restoring states from the checkpoint path" in log1
    history = [json.loads(line) for line in (trial1 / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]  # epoch 0 not repeated, epoch 1 done once
    metrics1 = json.loads((trial1 / "metrics.json").read_text())
    assert metrics1["epochs"] == 2 and [h["epoch"] for h in metrics1["history"]] == [0, 1]

    with open(sweep_dir / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run dir"] for r in rows) == [str(trial0), str(trial1)]
    assert {r["state"] for r in rows} == {"finished"}
    assert sorted(float(r["model.lr"]) for r in rows) == [0.003, 0.01]  # the engine knew trial-00's point
    state = json.loads((sweep_dir / "trials.json").read_text())
    assert [t["state"] for t in state] == ["finished", "finished"]
