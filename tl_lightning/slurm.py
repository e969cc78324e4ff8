"""``python -m tl_lightning submit``: render the sbatch template for a config and submit it with ``sbatch``.

The job runs ``srun python -m tl_lightning fit --config CFG`` with one task per device (Lightning's
``SLURMEnvironment`` takes the ranks from srun). ``--signal=SIGUSR1@90`` plus Lightning's auto-requeue save
``hpc_ckpt_<n>.ckpt`` into the run directory and requeue the job; the run directory is named after the job id
(``<run root>/slurm-<job id>``), which a requeued job keeps, so it resumes from that checkpoint.

Arguments that are not ``submit`` options (``--model.lr=0.01``, ``--trainer.max_epochs=5``) go to ``fit``.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tl_lightning.atomic import write_text
from tl_lightning.errors import TLError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
#: ``#SBATCH`` lines whose value may be left out (the cluster's default applies)
_OPTIONAL = {"partition", "gpus_per_node", "time"}
#: sbatch --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or UNLIMITED
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d+|\d+:\d+:\d+|\d+-\d+|\d+-\d+:\d+|\d+-\d+:\d+:\d+|UNLIMITED|INFINITE)$",
                         re.IGNORECASE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tl_lightning submit",
        description="Submit `fit --config CFG` as a SLURM batch job (one task per device, auto-requeue). "
                    "Unknown --key=value arguments are passed on to `fit`.")
    p.add_argument("--config", action="append", required=True, help="config file(s) for `fit` (repeatable)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (trainer.num_nodes)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; 0 trains on CPUs")
    p.add_argument("--devices", type=int, default=None,
                   help="processes per node = trainer.devices (default: --gpus-per-node, or 1 on CPU)")
    p.add_argument("--cpus-per-task", type=int, default=4, help="CPU cores per process (data loading)")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    p.add_argument("--time", default="24:00:00", help="time limit, e.g. 04:00:00 or 2-00:00:00")
    p.add_argument("--job-name", default=None, help="job name (default: tl-<config name>)")
    p.add_argument("--run-root", default=None,
                   help="folder for the run directories <run-root>/slurm-<job id> (default: runs/<config name>)")
    p.add_argument("--python", default=sys.executable, help="Python interpreter on the compute nodes")
    p.add_argument("--template", default=str(TEMPLATE), help="sbatch template with {{placeholders}}")
    p.add_argument("--dry-run", action="store_true", help="print the rendered script instead of submitting it")
    return p


def render(template: str, values: dict) -> str:
    """Fill ``{{name}}`` placeholders; ``#SBATCH`` lines of optional options left empty are dropped."""
    out = []
    for line in template.splitlines():
        names = _PLACEHOLDER.findall(line)
        missing = [n for n in names if n not in values]
        if missing:
            raise TLError(f"the sbatch template has an unknown placeholder {{{{{missing[0]}}}}}; "
                          f"use one of {', '.join(sorted(values))}.")
        if line.startswith("#SBATCH") and any(n in _OPTIONAL and values[n] in (None, "", 0) for n in names):
            continue
        out.append(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    return "\n".join(out) + "\n"


def job_values(args: argparse.Namespace, fit_args: list[str]) -> dict:
    """Template values from the command line (checked, with paths made absolute)."""
    for path in args.config:
        if not os.path.isfile(path):
            raise TLError(f"config file '{path}' does not exist; pass an existing file to --config.")
    for name in ("nodes", "cpus_per_task"):
        if getattr(args, name) < 1:
            raise TLError(f"--{name.replace('_', '-')} must be at least 1.")
    if args.gpus_per_node < 0:
        raise TLError("--gpus-per-node must be 0 (CPU) or more.")
    if args.devices is not None and args.devices < 1:
        raise TLError(f"--devices {args.devices} must be at least 1 (processes per node).")
    if not _SLURM_TIME.match(args.time):
        raise TLError(f"--time {args.time} is not a SLURM time limit; use minutes, HH:MM:SS or D-HH:MM:SS "
                      "(e.g. --time 04:00:00).")
    devices = args.devices or args.gpus_per_node or 1
    if args.gpus_per_node and devices != args.gpus_per_node:
        raise TLError(f"--devices {devices} differs from --gpus-per-node {args.gpus_per_node}; "
                      "on GPUs each process drives one GPU, so leave --devices out.")
    stem = Path(args.config[-1]).stem
    bad = [a for a in fit_args if not a.startswith("--")]
    if bad:
        raise TLError(f"unexpected argument '{bad[0]}'; pass `fit` options as --key=value.")
    return {
        "job_name": args.job_name or f"tl-{stem}",
        "nodes": args.nodes,
        "tasks_per_node": devices,
        "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task,
        "time": args.time,
        "partition": args.partition,
        "workdir": shlex.quote(os.getcwd()),
        "runs_root": shlex.quote(os.path.abspath(args.run_root or os.path.join("runs", stem))),
        "python": shlex.quote(args.python),
        "config": " --config ".join(shlex.quote(os.path.abspath(c)) for c in args.config),
        "accelerator": "gpu" if args.gpus_per_node else "cpu",
        "strategy": "ddp" if devices * args.nodes > 1 else "auto",
        "fit_args": "".join(f" \\\n  {shlex.quote(a)}" for a in fit_args),
    }


def submit(script: str, runs_root: str) -> str:
    """Write the script next to the run directories and ``sbatch`` it; returns the job id."""
    if shutil.which("sbatch") is None:
        raise TLError("`sbatch` was not found; run `submit` on a SLURM login node, or use --dry-run to see the script.")
    os.makedirs(runs_root, exist_ok=True)
    path = os.path.join(runs_root, f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    write_text(path, script)
    proc = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        raise TLError(f"sbatch rejected the job: {reason[-1] if reason else 'exit ' + str(proc.returncode)}.")
    return proc.stdout.strip().split(";")[0]


def main(argv: Optional[list[str]] = None) -> None:
    args, fit_args = build_parser().parse_known_args(argv)
    values = job_values(args, fit_args)
    from tl_lightning.cli import check_arguments  # the fit arguments, checked before any script is written

    check_arguments([*[a for c in args.config for a in ("--config", os.path.abspath(c))], *fit_args])
    try:
        template = Path(args.template).read_text()
    except OSError as e:
        raise TLError(f"cannot read the sbatch template '{args.template}' ({e.strerror}); fix --template.") from e
    script = render(template, values)
    if args.dry_run:
        print(script, end="")
        return
    runs_root = shlex.split(values["runs_root"])[0]
    job_id = submit(script, runs_root)
    print(f"Submitted batch job {job_id}")
    print(f"run directory: {os.path.join(runs_root, f'slurm-{job_id}')}")
    print(f"log: {os.path.join(runs_root, f'slurm-{job_id}.out')}")
