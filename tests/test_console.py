"""A run's console holds what the user needs: the expected Lightning noise is silenced, real warnings stay."""
from __future__ import annotations

from fault_helpers import QUICK, cli


def test_a_fit_prints_no_expected_noise_and_keeps_real_warnings(tmp_path):
    proc = cli("fit", *QUICK, f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_epochs=1",
              "--trainer.logger=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for noise in ("LeafSpec", "You have overridden `on_after_batch_transfer`", "module(s) in eval mode",
                  "💡 Tip", "litlogger"):
        assert noise not in out, noise
    # a real warning is kept: 2 training batches are fewer than the logging interval
    assert "smaller than the logging interval" in out
    assert "Results (fit)" in proc.stdout
