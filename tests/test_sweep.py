"""W&B sweeps: every file in sweeps/ is a valid W&B sweep whose parameters the CLI accepts, bad files name the
bad key, and a local offline sweep runs its trials with the engine's parameters and writes a leaderboard."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, read_metrics, run_cli
from tl_lightning import sweep, sweep_trials
from tl_lightning.errors import TLError

SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
OUR_METRICS = ("val/acc", "val/loss", "val/mAP", "test/acc", "test/loss", "test/mAP", "train/loss", "train/acc")


def test_there_are_sweep_files():
    assert len(SWEEP_FILES) >= 2


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_file_is_valid_and_its_parameters_reach_the_cli(path, monkeypatch, capsys):
    config = sweep.load_sweep(str(path))  # W&B's schema: raises on any violation
    assert sweep.schema_errors(config) == []
    assert config["metric"]["name"] in OUR_METRICS
    command = config["command"]
    assert "${args}" in command and command[command.index("-m") + 1:command.index("-m") + 3] == ["tl_lightning", "fit"]
    configs = [command[i + 1] for i, c in enumerate(command) if c == "--config"]
    assert configs and all((REPO / c).is_file() for c in configs)
    assert all("." in key for key in config["parameters"])  # dotted CLI keys such as model.lr

    # a proposal of W&B's engine, expanded as `wandb agent` does, parses in the real CLI with those values
    proposal = sweep._engine().next_run(config, [], validate=True)
    params = {k: v["value"] for k, v in proposal.config.items()}
    argv = sweep.trial_command(config, params, "runs/sweep-check")
    argv = argv[argv.index("tl_lightning") + 1:]
    argv = [a for a in argv if not a.startswith("--trainer.callbacks+=")]
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        run_cli(*argv, "--print_config")
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in params.items():
        node = printed
        section, *rest = key.split(".")
        node = node[section]
        if "init_args" in node and rest[0] != "init_args":
            node = node["init_args"]
        for part in rest:
            node = node[part]
        assert node == pytest.approx(value) if isinstance(value, float) else node == value, key


def test_invalid_sweep_file_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"model.lr": {"valuez": [0.1, 0.01]}},
        "command": ["${env}", "python", "-m", "tl_lightning", "fit", "${args}"],
    }))
    with pytest.raises(TLError, match=r"parameters\.model\.lr: unknown key 'valuez'"):
        sweep.load_sweep(str(bad))
    bad.write_text(yaml.safe_dump({"method": "grid", "metirc": {"name": "val/acc"},
                                   "parameters": {"model.lr": {"values": [0.1]}}}))
    with pytest.raises(TLError, match="'metirc' was unexpected"):
        sweep.load_sweep(str(bad))
    bad.write_text(yaml.safe_dump({"method": "random", "metric": {"name": "val/acc", "goal": "maximise"},
                                   "parameters": {"model.lr": {"min": 0.1, "max": 0.01}}}))
    with pytest.raises(TLError, match=r"metric\.goal: 'maximise' is not one of"):
        sweep.load_sweep(str(bad))


def _quick_sweep(tmp_path: Path, extra: dict) -> Path:
    """A 2-point grid over the quickstart's learning rate at 32 px, 2 epochs, on pooled features."""
    config = {
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"model.lr": {"values": [0.0003, 0.01]}},
        "command": ["${env}", "python", "-m", "tl_lightning", "fit", "--config", str(REPO / "configs/quickstart.yaml"),
                    "--data.image_size=32", "--model.embedding=pooled", "--trainer.max_epochs=2",
                    "--data.num_workers=0", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", "--trainer.logger=false", "${args}"],
        **extra,
    }
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_dry_run_proposes_without_running(tmp_path, capsys):
    path = _quick_sweep(tmp_path, {})
    sweep.main([str(path), "--dry-run", "--dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "--model.lr=0.0003" in out and "--model.lr=0.01" in out  # `wandb agent`'s ${args} format
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_trial_offline_sweep_writes_a_leaderboard(tmp_path, capsys):
    path = _quick_sweep(tmp_path, {})
    out_dir = tmp_path / "out"
    sweep.main([str(path), "--count", "2", "--dir", str(out_dir)])
    rows = list(csv.DictReader((out_dir / "leaderboard.csv").open()))
    assert len(rows) == 2
    assert {float(r["model.lr"]) for r in rows} == {0.0003, 0.01}  # two runs, different parameters
    assert all(r["state"] == "finished" for r in rows)
    values = [float(r["val/acc"]) for r in rows]
    assert values == sorted(values, reverse=True)  # best first (goal: maximize)
    for row in rows:
        run = Path(row["run dir"])
        metrics = read_metrics(run)
        assert float(row["val/acc"]) == pytest.approx(metrics["metrics"]["val/acc"], abs=1e-4)
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["init_args"]["lr"] == pytest.approx(float(row["model.lr"]))
        assert len([json.loads(line) for line in (run / "history.jsonl").open()]) == 2  # streamed per epoch
    assert "| rank | model.lr | val/acc |" in (out_dir / "leaderboard.md").read_text()


EPOCHS_SCRIPT = """
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
run_dir = os.environ["TL_SWEEP_RUN_DIR"]
os.makedirs(run_dir, exist_ok=True)
quality = float(args["quality"])


def stopped(signum, frame):  # the runner's SIGINT
    open(os.path.join(run_dir, "got_sigint"), "w").close()
    sys.exit(130)


signal.signal(signal.SIGINT, stopped)
# a good trial streams 8 epochs; a bad one 3 (past hyperband's first band, min_iter 2), published at once (rename),
# and then waits for the runner's verdict: the runner sees all 3 rows however slowly this machine runs
epochs = 8 if quality > 0 else 3
rows = "".join(json.dumps({"epoch": e, "val/loss": 1.0 - quality * e / 8}) + "\\n" for e in range(epochs))
with open(os.path.join(run_dir, "history.tmp"), "w") as f:
    f.write(rows)
os.replace(os.path.join(run_dir, "history.tmp"), os.path.join(run_dir, "history.jsonl"))
if quality == 0:
    time.sleep(600)  # safety net only: a runner that never stops the trial lets it end "finished", and fail
"""


def test_hyperband_early_termination_stops_a_bad_trial(tmp_path, monkeypatch):
    """The engine's hyperband judges the streamed history; the trial it stops gets SIGINT and is marked.

    Deterministic: the bad trial blocks after its third epoch until the runner acts on it, so the verdict does
    not depend on how fast the trial runs against the poll interval."""
    monkeypatch.setattr(sweep_trials, "POLL_S", 0.3)
    script = tmp_path / "epochs.py"
    script.write_text(EPOCHS_SCRIPT)
    config = {
        "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"quality": {"values": [1.0, 0.0]}},
        "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 3},
        "command": [sys.executable, str(script), "${args}"],
    }
    path = tmp_path / "hb.yaml"
    path.write_text(yaml.safe_dump(config))
    sweep.main([str(path), "--dir", str(tmp_path / "out")])
    rows = {r["quality"]: r for r in csv.DictReader((tmp_path / "out" / "leaderboard.csv").open())}
    assert rows["1.0"]["state"] == "finished"
    assert rows["0.0"]["state"] == "stopped"  # the engine's decision, not a count of epochs that slipped through
    bad = tmp_path / "out" / "trial-01"
    assert (bad / "got_sigint").exists()  # stopped by the runner's SIGINT, not by the safety net
    assert len((bad / "history.jsonl").read_text().splitlines()) == 3
    assert float(rows["0.0"]["val/loss"]) == pytest.approx(1.0)  # the stopped trial's last streamed value
