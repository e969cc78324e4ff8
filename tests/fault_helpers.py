"""Shared by the fault tests (issue 15): a small, fast quickstart fit and a process runner for the CLI."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from helpers import FAST, REPO
from helpers.launch import run_launched

#: the quickstart (frozen backbone + linear head on scikit-learn digits) shrunk to a few seconds
QUICK = ("--config", str(REPO / "configs/quickstart.yaml"), "--data.image_size=32", "--model.embedding=pooled",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", *FAST)


#: ``python -m tl_lightning ARGS`` as a process of its own (forked, ``helpers.launch``), output captured
cli = run_launched


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line of a failed command (asserts there is exactly one and no traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def experiment_overlay(tmp_path: Path, root: Path) -> str:
    """A config file that sets the experiment folder (as the shipped configs do)."""
    overlay = tmp_path / f"overlay-{root.name}.yaml"
    overlay.write_text(f"trainer:\n  default_root_dir: {root}\n")
    return str(overlay)


def one_error(capsys, *args) -> str:
    """Run the CLI in this process, expect exit 2 and exactly one ``error:`` line, no traceback; return the line.

    (A "--- Logging error ---" report of Python's logging, a handler left on an earlier test's closed capture
    stream, is not output of the command and is ignored.)
    """
    import pytest

    from helpers import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(*args)
    err = re.sub(r"--- Logging error ---.*?Arguments: \(.*?\)\n", "", capsys.readouterr().err, flags=re.S)
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]
