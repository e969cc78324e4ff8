"""The CLI in process, a run's ``metrics.json``, the repository root and the fast trainer flags of smoke tests."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Fast trainer flags for CLI smoke tests: tiny images, no progress bars, CPU.
FAST = (
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.logger=false", "--data.num_workers=0",
)


def run_cli(*args: str) -> None:
    """Run ``python -m tl_lightning ARGS`` in this process (raises SystemExit on CLI errors)."""
    from tl_lightning.cli import main

    main([str(a) for a in args])


def read_metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())
