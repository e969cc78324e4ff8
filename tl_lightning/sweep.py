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

Resuming: run the same sweep file again with ``--dir <sweep dir>``. The trials recorded there are kept (the engine
sees them as history), a trial the runner was killed in resumes from its ``last.ckpt``, ``--count`` is the total
number of trials, and the leaderboard covers all of them (see ``tl_lightning.sweep_trials``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path
from typing import Optional

import yaml

from tl_lightning.atomic import write_text
from tl_lightning.errors import TLError
from tl_lightning.parser_errors import yaml_sentence
from tl_lightning.sweep_trials import (Trial, _engine, load_trials, run_trial, save_trials, sweep_run,  # noqa: F401
                                       trial_command, write_leaderboard)


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


# ----- main -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tl_lightning sweep",
                                description="Run a W&B sweep file locally (offline): W&B's engine proposes the "
                                            "parameters, trials run one after another, a leaderboard is written. "
                                            "Run it again with the same --dir to continue the sweep.")
    p.add_argument("sweep_file", help="W&B sweep YAML, e.g. sweeps/quickstart_lr.yaml")
    p.add_argument("--count", type=int, default=None,
                   help="total number of trials, those an earlier run of this sweep made included "
                        "(default: all of a grid, else 5)")
    p.add_argument("--dir", default=None, help="sweep directory (default: runs/sweeps/<file name>-<time>); an "
                                               "existing one is continued")
    p.add_argument("--dry-run", action="store_true", help="print the proposed trials' commands; run nothing")
    return p


def open_sweep_dir(sweep_dir: str, config: dict, sweep_file: str) -> list[Trial]:
    """Create the sweep folder, or read back the trials of the same sweep run there before."""
    saved = os.path.join(sweep_dir, "sweep.yaml")
    if os.path.exists(saved):
        with open(saved) as f:
            before = yaml.safe_load(f)
        if before != config:
            raise TLError(f"'{sweep_dir}' holds a different sweep than '{sweep_file}'; pass that sweep's file, "
                          "or a new --dir.")
        return load_trials(sweep_dir)
    write_text(saved, yaml.safe_dump(config, sort_keys=False))
    return []


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
    trials: list[Trial] = [] if args.dry_run else open_sweep_dir(sweep_dir, config, args.sweep_file)
    done = [t for t in trials if t.state != "running"]
    unfinished = [t for t in trials if t.state == "running"]
    if trials:
        print(f"continuing the sweep in {sweep_dir}: {len(done)} trial(s) done, {len(unfinished)} to resume", flush=True)
    save = (lambda: save_trials(done + unfinished, sweep_dir)) if not args.dry_run else None
    for trial in list(unfinished):  # killed mid-way: resume from last.ckpt
        run_trial(trial, config, done, on_start=save)
        unfinished.remove(trial)
        done.append(trial)
        save()
        _report(trial, metric)
    for i in range(len(done), count):
        proposal = sweeps.next_run(config, [sweep_run(t, metric) for t in done], validate=True)
        if proposal is None:  # a grid is exhausted
            break
        params = {k: v["value"] for k, v in proposal.config.items()}
        name = f"trial-{i:02d}"
        trial = Trial(name, params, os.path.join(sweep_dir, name))
        trial.command = trial_command(config, params, trial.run_dir)
        print(f"{name}: {' '.join(shlex.quote(c) for c in trial.command)}", flush=True)
        if args.dry_run:
            trial.state = "finished"  # the grid moves on; bayes sees no metric
            done.append(trial)
            continue
        unfinished.append(trial)
        run_trial(trial, config, done, on_start=save)
        unfinished.remove(trial)
        done.append(trial)
        save()
        _report(trial, metric)
    if args.dry_run:
        return
    md, csv_path = write_leaderboard(done, config, sweep_dir)
    print(Path(md).read_text())
    print(f"leaderboard: {md} and {csv_path}")
    if done and all(t.state == "failed" for t in done):
        raise TLError(f"all {len(done)} trials failed; see {done[0].run_dir}/output.log.")


def _report(trial: Trial, metric: Optional[str]) -> None:
    shown = "n/a" if trial.metric is None else f"{trial.metric:.4f}"
    print(f"  {trial.name}: {trial.state}, {metric} = {shown} ({trial.wall_s:.0f} s; {trial.run_dir})", flush=True)
    if trial.state == "failed":
        print(f"  {trial.name} failed: see {os.path.join(trial.run_dir, 'output.log')}", flush=True)
