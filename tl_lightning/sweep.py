"""``python -m tl_lightning sweep sweeps/X.yaml --count N``: a W&B sweep run locally, offline.

The sweep file is a plain W&B sweep config (``wandb sweep sweeps/X.yaml`` + ``wandb agent`` run it online).
Here W&B's own engine (the ``sweeps`` package: schema, grid/random/bayes search, hyperband early termination)
proposes each trial's parameters, and the trial runs the sweep's ``command`` with the macros expanded the way
``wandb agent`` expands them (``${args}`` -> ``--model.lr=0.01 ...``), plus a run directory of its own:
``<sweep dir>/trial-NN``. The metric is read from the trial's ``metrics.json``; a leaderboard (params, metric,
run dir; best first) is written as ``leaderboard.md`` and ``leaderboard.csv``.

Early termination: with ``early_terminate`` in the file, each trial streams its per-epoch metrics
(``history.jsonl``), the engine's ``stop_runs`` judges it against the trials before it, and a trial it stops
gets SIGINT (Lightning shuts down gracefully).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from tl_lightning.callbacks.history import read_history
from tl_lightning.atomic import atomic_open, write_text
from tl_lightning.errors import TLError
from tl_lightning.parser_errors import yaml_sentence

HISTORY_CALLBACK = "--trainer.callbacks+=tl_lightning.callbacks.history.HistoryStream"
POLL_S = 2.0


def _engine():
    """W&B's sweep engine (imported lazily: it pulls in pydantic and numpy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


# ----- the sweep file -----------------------------------------------------------------------------------------
def _where(path) -> str:
    parts = list(path)
    return ".".join(str(p) for p in parts) if parts else "top level"


def _leaves(err) -> list:
    return [leaf for sub in err.context for leaf in _leaves(sub)] if err.context else [err]


def _parameter_keys() -> set[str]:
    """Every key some parameter form of W&B's schema accepts (values, min, max, distribution, ...)."""
    from sweeps.config.schema import dereferenced_sweep_config_jsonschema as schema

    keys: set[str] = set()

    def walk(node, depth: int) -> None:
        if not isinstance(node, dict) or depth > 4:
            return
        keys.update(node.get("properties", {}))
        for branch in node.get("anyOf", []) + node.get("oneOf", []) + node.get("allOf", []):
            walk(branch, depth + 1)

    walk(schema["definitions"]["parameter"], 0)
    return keys


def _closest_causes(err) -> list[str]:
    """For an ``anyOf`` error (a parameter that fits no parameter form), the violations that explain it best:
    a key no form allows, else the deepest violations (e.g. a wrong value type)."""
    leaves = _leaves(err)
    allowed = _parameter_keys() if list(err.absolute_path)[:1] == ["parameters"] else set()
    if allowed and isinstance(err.instance, dict):
        unknown = [k for k in err.instance if k not in allowed]
        if unknown:
            return [f"{_where(err.absolute_path)}: unknown key '{unknown[0]}' (a parameter takes "
                    f"{', '.join(sorted(allowed))})"]
    depth = max(len(leaf.absolute_path) for leaf in leaves)
    return [f"{_where(leaf.absolute_path)}: {leaf.message}" for leaf in leaves if len(leaf.absolute_path) == depth]


def schema_errors(config: dict) -> list[str]:
    """Every violation of W&B's sweep schema, each naming where it is (``parameters.model.lr: ...``)."""
    sweeps = _engine()
    from sweeps.config.schema import validator

    errors = []
    for err in validator.iter_errors(config):
        errors += _closest_causes(err) if err.context else [f"{_where(err.absolute_path)}: {err.message}"]
    if not errors:  # the engine's own checks beyond the JSON schema (min < max, probabilities, ...)
        errors = list(sweeps.schema_violations_from_proposed_config(config))
    return list(dict.fromkeys(errors))


def load_sweep(path: str) -> dict:
    """Read and validate a W&B sweep file; a schema violation raises ``TLError`` naming the bad key."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise TLError(f"sweep file '{path}' does not exist; pass a file from sweeps/.") from None
    except yaml.YAMLError as e:
        raise TLError(f"sweep file {yaml_sentence(path, e)}") from None
    if not isinstance(config, dict):
        raise TLError(f"sweep file '{path}' must be a mapping with method, metric, parameters and command.")
    try:
        errors = schema_errors(config)
    except ValueError as e:  # the engine refuses a parameter that is not a mapping
        errors = [str(e)]
    if errors:
        raise TLError(f"invalid sweep file '{path}': " + "; ".join(errors) + " (see the W&B sweep configuration docs).")
    command = config.get("command")
    if command is not None and not any(str(c).startswith("${args") for c in command):
        raise TLError(f"the command of sweep file '{path}' has no ${{args}}; the trials would not get their "
                      "parameters. Add ${args} to command.")
    if config["method"] == "bayes" and "metric" not in config:
        raise TLError(f"sweep file '{path}' uses method: bayes, which needs a metric (name and goal).")
    return config


# ----- trials ---------------------------------------------------------------------------------------------------
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


def run_trial(trial: Trial, config: dict, done: list[Trial]) -> None:
    """Run one trial to its end (or until the engine's early termination stops it)."""
    sweeps = _engine()
    metric = (config.get("metric") or {}).get("name")
    os.makedirs(trial.run_dir, exist_ok=True)
    started = time.perf_counter()
    with open(os.path.join(trial.run_dir, "output.log"), "w") as log:
        proc = subprocess.Popen(trial.command, stdout=log, stderr=subprocess.STDOUT, env=trial_env(trial.run_dir))
        trial.state = "running"
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
    trial.wall_s = time.perf_counter() - started
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
    md = os.path.join(sweep_dir, "leaderboard.md")
    with atomic_open(md, "w") as f:
        f.write(f"# Sweep leaderboard: {metric} ({goal}), method {config['method']}\n\n")
        f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for row in rows:
            f.write("| " + " | ".join(row) + " |\n")
    csv_path = os.path.join(sweep_dir, "leaderboard.csv")
    with atomic_open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return md, csv_path


# ----- main -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tl_lightning sweep",
                                description="Run a W&B sweep file locally (offline): W&B's engine proposes the "
                                            "parameters, trials run one after another, a leaderboard is written.")
    p.add_argument("sweep_file", help="W&B sweep YAML, e.g. sweeps/quickstart_lr.yaml")
    p.add_argument("--count", type=int, default=None, help="number of trials (default: all of a grid, else 5)")
    p.add_argument("--dir", default=None, help="sweep directory (default: runs/sweeps/<file name>-<time>)")
    p.add_argument("--dry-run", action="store_true", help="print the proposed trials' commands; run nothing")
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    config = load_sweep(args.sweep_file)
    sweeps = _engine()
    count = args.count if args.count is not None else (10 ** 6 if config["method"] == "grid" else 5)
    if count < 1:
        raise TLError("--count must be at least 1.")
    stem = Path(args.sweep_file).stem
    sweep_dir = os.path.abspath(args.dir or os.path.join("runs", "sweeps", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
    metric = (config.get("metric") or {}).get("name")
    trials: list[Trial] = []
    if not args.dry_run:
        os.makedirs(sweep_dir, exist_ok=True)
        with atomic_open(os.path.join(sweep_dir, "sweep.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
    for i in range(count):
        proposal = sweeps.next_run(config, [sweep_run(t, metric) for t in trials], validate=True)
        if proposal is None:  # a grid is exhausted
            break
        params = {k: v["value"] for k, v in proposal.config.items()}
        name = f"trial-{i:02d}"
        trial = Trial(name, params, os.path.join(sweep_dir, name))
        trial.command = trial_command(config, params, trial.run_dir)
        print(f"{name}: {' '.join(shlex.quote(c) for c in trial.command)}", flush=True)
        if args.dry_run:
            trial.state = "finished"  # the grid moves on; bayes sees no metric
        else:
            run_trial(trial, config, trials)
            shown = "n/a" if trial.metric is None else f"{trial.metric:.4f}"
            print(f"  {name}: {trial.state}, {metric} = {shown} ({trial.wall_s:.0f} s; {trial.run_dir})", flush=True)
            if trial.state == "failed":
                print(f"  {name} failed: see {os.path.join(trial.run_dir, 'output.log')}", flush=True)
        trials.append(trial)
    if args.dry_run:
        return
    md, csv_path = write_leaderboard(trials, config, sweep_dir)
    print(Path(md).read_text())
    print(f"leaderboard: {md} and {csv_path}")
    if all(t.state == "failed" for t in trials):
        raise TLError(f"all {len(trials)} trials failed; see {trials[0].run_dir}/output.log.")
