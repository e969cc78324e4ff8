"""``python -m tl_lightning compare runs/a runs/b ...`` (or a glob, ``'runs/sweeps/x/trial-*'``): runs side by side.

Each run folder's ``metrics.json`` and ``config.yaml`` are read. The table shows the hyperparameters that differ
between the runs (dotted config keys), every final metric, the best value of each validation metric over the
epochs (with its epoch), the epochs trained, the wall time and the checkpoint. It is printed, and written as
``comparison.md`` and ``comparison.csv`` with ``comparison_curves.png`` (every run's learning curves overlaid,
one panel per metric) into ``--out`` (default: the folder that holds the runs).

A folder without ``metrics.json`` but with a ``latest`` pointer (an experiment folder of versioned runs) stands
for the run ``latest`` points at.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
from typing import Any, Optional

import yaml

from tl_lightning.atomic import save_figure, write_text
from tl_lightning.errors import TLError

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
LATEST = "latest"
#: config keys that name the run itself, not a choice that makes runs differ
IGNORED_KEYS = ("trainer.default_root_dir",)
MAX_PANELS = 6


def run_folder(path: str) -> Optional[str]:
    """The run folder ``path`` stands for: itself when it holds ``metrics.json``, else what its ``latest`` points
    at when that holds one; None otherwise."""
    if os.path.isfile(os.path.join(path, METRICS_FILE)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(os.path.join(latest, METRICS_FILE)):
        return os.path.join(os.path.dirname(latest), os.readlink(latest)) if os.path.islink(latest) else latest
    return None


def find_runs(patterns: list[str]) -> list[str]:
    """Run folders from paths and globs, in the order given (a glob's matches sorted), each once.

    A path typed as is must be a finished run; glob matches that are not runs (files, unfinished runs) are
    skipped, since a glob such as ``trial-*`` or ``runs/*`` routinely matches some."""
    runs: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            found = [r for r in (run_folder(m) for m in matches if os.path.isdir(m)) if r]
            if not found:
                raise TLError(f"no finished run (a folder with {METRICS_FILE}) matches '{pattern}'; "
                              "check the pattern, or quote it so the shell does not expand it first.")
            runs += found
            continue
        if not os.path.isdir(pattern):
            raise TLError(f"run folder '{pattern}' does not exist; pass run folders such as runs/quickstart.")
        found = run_folder(pattern)
        if found is None:
            raise TLError(f"'{pattern}' has no {METRICS_FILE} (the run has not finished, or it is not a run "
                          "folder); pass folders of finished runs.")
        runs.append(found)
    unique, seen = [], set()
    for run in runs:
        key = os.path.realpath(run)
        if key not in seen:
            seen.add(key)
            unique.append(run)
    return unique


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config mappings as ``{"model.init_args.lr": 0.01, ...}``; lists are kept whole (as JSON text)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(node, list):
        return {prefix: json.dumps(node, sort_keys=True, default=str)}
    return {prefix: node}


def load_run(run_dir: str) -> dict:
    """A run's metrics (``metrics.json``) and flattened config (``config.yaml``, empty when missing)."""
    path = os.path.join(run_dir, METRICS_FILE)
    try:
        with open(path) as f:
            payload = json.load(f)
    except json.JSONDecodeError as e:
        raise TLError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno}); rerun that run or leave it out.") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("metrics"), dict):
        raise TLError(f"'{path}' has no 'metrics' mapping; it was not written by tl_lightning, leave it out.")
    config_path = os.path.join(run_dir, CONFIG_FILE)
    config: dict = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = flatten(yaml.safe_load(f) or {})
    return {"dir": run_dir, "payload": payload, "params": config}


def differing_params(runs: list[dict]) -> list[str]:
    """Config keys whose value is not the same in every run (missing in some counts as different)."""
    keys = sorted({k for r in runs for k in r["params"]} - set(IGNORED_KEYS))
    missing = object()
    return [k for k in keys if len({json.dumps(r["params"].get(k, missing), default=str) for r in runs}) > 1]


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1].lower()
    return "loss" in name or "error" in name or name.endswith("err")


def best_of(history: list[dict], metric: str) -> Optional[tuple[float, int]]:
    """The best value of ``metric`` over the epochs and its epoch (lowest for losses/errors, else highest)."""
    points = [(float(row[metric]), int(row.get("epoch", i))) for i, row in enumerate(history)
              if isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])]
    if not points:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(points, key=lambda p: p[0])


def _history(run: dict) -> list[dict]:
    rows = run["payload"].get("history") or []
    return [r for r in rows if isinstance(r, dict)]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value)


def run_labels(runs: list[dict]) -> list[str]:
    """Short, distinct names: each run folder relative to the folder all of them share."""
    paths = [os.path.abspath(r["dir"]) for r in runs]
    if len(paths) == 1:
        return [os.path.basename(paths[0])]
    common = os.path.commonpath(paths)
    return [os.path.relpath(p, common) if p != common else os.path.basename(p) for p in paths]


def comparison_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: run, differing hyperparameters, final metrics, best validation metrics, epochs,
    wall time, checkpoint."""
    params = differing_params(runs)
    finals = sorted({k for r in runs for k, v in r["payload"]["metrics"].items() if isinstance(v, (int, float))})
    bests = sorted({k for r in runs for row in _history(r) for k in row if k.startswith("val/")})
    header = ["run", *params, *finals, *(f"best {k} (epoch)" for k in bests), "epochs", "wall time (s)", "checkpoint"]
    rows = []
    for label, run in zip(run_labels(runs), runs):
        payload = run["payload"]
        row = [label, *("" if run["params"].get(k) is None else str(run["params"][k]) for k in params)]
        row += [_fmt(payload["metrics"].get(k)) for k in finals]
        for k in bests:
            best = best_of(_history(run), k)
            row.append("" if best is None else f"{_fmt(best[0])} ({best[1]})")
        last = os.path.join(run["dir"], "checkpoints", "last.ckpt")
        ckpt = payload.get("best_checkpoint") or (last if os.path.isfile(last) else "")
        wall = payload.get("wall_time_s")
        row += [_fmt(payload.get("epochs")), f"{wall:.1f}" if isinstance(wall, (int, float)) else "", ckpt]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], labels: list[str], path: str) -> Optional[str]:
    """Every run's per-epoch curves overlaid, one panel per metric (validation first); None without history."""
    keys = sorted({k for r in runs for row in _history(r) for k, v in row.items()
                   if k != "epoch" and not k.startswith("lr") and isinstance(v, (int, float))},
                  key=lambda k: (not k.startswith("val/"), k))[:MAX_PANELS]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, run in zip(labels, runs):
            pts = [(row.get("epoch", i), row[key]) for i, row in enumerate(_history(run))
                   if isinstance(row.get(key), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def default_out(runs: list[str]) -> str:
    parents = [os.path.dirname(os.path.abspath(r)) for r in runs]
    return os.path.commonpath(parents)


def compare(patterns: list[str], out: Optional[str] = None) -> dict:
    """Compare the runs; write the table and the plot into ``out``; returns the paths written and the table."""
    run_dirs = find_runs(patterns)
    runs = [load_run(d) for d in run_dirs]
    out = out or default_out(run_dirs)
    header, rows = comparison_table(runs)
    table = markdown(header, rows)
    md = write_text(os.path.join(out, "comparison.md"),
                           f"# Comparison of {len(runs)} runs\n\n{table}")
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    csv_path = write_text(os.path.join(out, "comparison.csv"), buffer.getvalue())
    plot = plot_curves(runs, run_labels(runs), os.path.join(out, "comparison_curves.png"))
    return {"md": md, "csv": csv_path, "plot": plot, "header": header, "rows": rows, "table": table}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tl_lightning compare",
                                description="Compare finished runs: differing hyperparameters, final and best "
                                            "metrics, wall time, checkpoint; writes comparison.md/.csv and an "
                                            "overlaid learning-curve plot.")
    p.add_argument("runs", nargs="+", help="run folders or quoted globs, e.g. runs/a runs/b or 'runs/sweeps/x/trial-*'")
    p.add_argument("--out", default=None, help="folder for comparison.md/.csv/_curves.png (default: the runs' parent)")
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    result = compare(args.runs, args.out)
    print(result["table"], end="")
    written = [result["md"], result["csv"]] + ([result["plot"]] if result["plot"] else [])
    print("written: " + ", ".join(written))
