"""The trials of a local sweep: their commands, the runner, the saved state that makes a sweep resumable, and
the leaderboard.

``<sweep dir>/trials.json`` records every trial (name, params, state, metric, wall time), rewritten atomically
whenever a trial starts or ends. Running the same sweep file again in that folder (``--dir``) reads it back:
finished, stopped and failed trials are kept (and fed to the engine as history); a trial left ``running`` (the
runner was killed) runs again, resuming from its ``checkpoints/last.ckpt`` when it has one.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from tl_lightning.atomic import write_text
from tl_lightning.callbacks.history import read_history, trim_history
from tl_lightning.errors import TLError

HISTORY_CALLBACK = "--trainer.callbacks+=tl_lightning.callbacks.history.HistoryStream"
POLL_S = 2.0
STATE_FILE = "trials.json"
LAST_CKPT = os.path.join("checkpoints", "last.ckpt")


def _engine():
    """W&B's sweep engine (imported lazily: it pulls in pydantic and numpy)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


# ----- one trial ---------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    name: str
    params: dict
    run_dir: str
    command: list[str] = field(default_factory=list)
    state: str = "pending"
    metric: Optional[float] = None
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def trial_command(config: dict, params: dict, run_dir: str) -> list[str]:
    """The sweep's ``command`` with the macros expanded as ``wandb agent`` does, plus the trial's run dir."""
    from wandb.sdk.launch.sweeps import utils as wandb_sweep_utils

    command = wandb_sweep_utils.create_sweep_command(config.get("command"))
    macros = wandb_sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[str(config.get("program", ""))])
    if "${args_json_file}" in command:
        path = os.path.join(run_dir, "args.json")
        os.makedirs(run_dir, exist_ok=True)
        write_text(path, macros["args_json"][0])
        macros["args_json_file"] = [path]
    out = []
    for chunk in map(str, command):
        out += list(macros.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    if "tl_lightning" in out and "fit" in out:
        out += [f"--trainer.default_root_dir={run_dir}", HISTORY_CALLBACK]
    return out


def trial_env(run_dir: str) -> dict:
    """The trial's environment: this interpreter's folder first on PATH (``python`` in ``command`` means it),
    and ``TL_SWEEP_RUN_DIR`` (the trial's run directory, for commands other than ``tl_lightning fit``)."""
    env = dict(os.environ)
    env["TL_SWEEP_RUN_DIR"] = run_dir
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def final_metric(trial: Trial, name: Optional[str]) -> Optional[float]:
    """The metric's final value: ``metrics.json`` of a finished run, else the last streamed epoch."""
    if not name:
        return None
    path = os.path.join(trial.run_dir, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            value = json.load(f).get("metrics", {}).get(name)
        if isinstance(value, (int, float)):
            return float(value)
    values = [row[name] for row in trial.history if isinstance(row.get(name), (int, float))]
    return float(values[-1]) if values else None


def sweep_run(trial: Trial, metric: Optional[str]):
    """The engine's view of a trial (``sweeps.SweepRun``)."""
    sweeps = _engine()
    states = {"finished": "finished", "stopped": "finished", "failed": "failed", "running": "running"}
    summary = {metric: trial.metric} if metric and trial.metric is not None else {}
    return sweeps.SweepRun(name=trial.name, state=states.get(trial.state, "pending"),
                           config={k: {"value": v} for k, v in trial.params.items()},
                           summary_metrics=summary, history=trial.history, stopped=trial.state == "stopped")


def run_trial(trial: Trial, config: dict, done: list[Trial], on_start=None) -> None:
    """Run one trial to its end (or until the engine's early termination stops it). A trial that was running
    when the runner was killed continues from its ``last.ckpt`` (``--ckpt_path``) when it has one.
    ``on_start`` is called once the trial is marked running (the runner saves its state there)."""
    sweeps = _engine()
    metric = (config.get("metric") or {}).get("name")
    os.makedirs(trial.run_dir, exist_ok=True)
    command = list(trial.command)
    resumed = trial.state == "running" and "tl_lightning" in command
    last = os.path.join(trial.run_dir, LAST_CKPT)
    if resumed and os.path.isfile(last):
        trim_history(trial.run_dir, checkpoint_step(last))
        command.append(f"--ckpt_path={last}")
        print(f"  {trial.name}: resuming from {last}", flush=True)
    elif resumed:  # killed before its first checkpoint: start it again
        trim_history(trial.run_dir, -1)
        print(f"  {trial.name}: killed before its first checkpoint; starting it again", flush=True)
    started = time.perf_counter()
    with open(os.path.join(trial.run_dir, "output.log"), "a" if resumed else "w") as log:
        trial.state = "running"
        if on_start is not None:
            on_start()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=trial_env(trial.run_dir))
        while proc.poll() is None:
            time.sleep(POLL_S)
            trial.history = read_history(trial.run_dir)
            if "early_terminate" in config and metric and trial.history:
                runs = [sweep_run(t, metric) for t in done + [trial]]
                if any(r.name == trial.name for r in sweeps.stop_runs(config, runs)):
                    print(f"  {trial.name}: stopped early by {config['early_terminate']['type']}", flush=True)
                    trial.state = "stopped"
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    trial.wall_s += time.perf_counter() - started
    trial.history = read_history(trial.run_dir)
    if trial.state != "stopped":
        trial.state = "finished" if proc.returncode == 0 else "failed"
    trial.metric = final_metric(trial, metric)


# ----- leaderboard ----------------------------------------------------------------------------------------------
def ranked(trials: list[Trial], goal: str) -> list[Trial]:
    """Trials with a metric, best first (``goal``: maximize/minimize), then those without."""
    scored = [t for t in trials if t.metric is not None]
    scored.sort(key=lambda t: t.metric, reverse=goal == "maximize")
    return scored + [t for t in trials if t.metric is None]


def write_leaderboard(trials: list[Trial], config: dict, sweep_dir: str) -> tuple[str, str]:
    metric = (config.get("metric") or {}).get("name", "metric")
    goal = (config.get("metric") or {}).get("goal", "minimize")
    keys = list(config["parameters"])
    header = ["rank", *keys, metric, "state", "wall time (s)", "run dir"]
    rows = []
    for i, t in enumerate(ranked(trials, goal), 1):
        value = "" if t.metric is None else f"{t.metric:.4f}"
        rows.append([str(i), *(str(t.params.get(k, "")) for k in keys), value, t.state, f"{t.wall_s:.1f}", t.run_dir])
    text = f"# Sweep leaderboard: {metric} ({goal}), method {config['method']}\n\n"
    text += "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    text += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    md = write_text(os.path.join(sweep_dir, "leaderboard.md"), text)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    return md, write_text(os.path.join(sweep_dir, "leaderboard.csv"), buffer.getvalue())


# ----- the saved state: a resumable sweep ----------------------------------------------------------------------
def save_trials(trials: list[Trial], sweep_dir: str) -> None:
    """Record every trial in ``<sweep dir>/trials.json`` (atomically; the streamed history is left out)."""
    rows = [{k: v for k, v in asdict(t).items() if k != "history"} for t in trials]
    write_text(os.path.join(sweep_dir, STATE_FILE), json.dumps(rows, indent=1) + "\n")


def load_trials(sweep_dir: str) -> list[Trial]:
    """The trials an earlier runner recorded in ``sweep_dir`` (none for a new sweep), histories re-read."""
    path = os.path.join(sweep_dir, STATE_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            rows = json.load(f)
        trials = [Trial(**row) for row in rows]
    except (json.JSONDecodeError, TypeError) as e:
        raise TLError(f"'{path}' is damaged ({e}); move it away to start the sweep afresh in '{sweep_dir}'.") from None
    for trial in trials:
        trial.history = read_history(trial.run_dir)
    return trials


def checkpoint_step(path: str) -> int:
    """The global step a checkpoint was saved at."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))
