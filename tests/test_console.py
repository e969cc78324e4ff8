"""A run's console holds what the user needs: the expected Lightning noise is silenced, real warnings stay."""
from __future__ import annotations

from fault_helpers import QUICK, cli


def test_a_fit_prints_no_expected_noise_and_keeps_real_warnings(tmp_path):
    proc = cli("fit", *QUICK, f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_epochs=1",
              "--trainer.logger=true", "--trainer.enable_model_summary=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for noise in ("LeafSpec", "You have overridden `on_after_batch_transfer`", "module(s) in eval mode",
                  "💡 Tip", "litlogger", "FLOPs", "already configured with model summary"):
        assert noise not in out, noise
    # a real warning is kept: 2 training batches are fewer than the logging interval
    assert "smaller than the logging interval" in out
    assert "Results (fit)" in proc.stdout
    assert "Trainable params" in out and "Modules in eval mode" in out  # the summary itself stays


def test_enable_model_summary_false_still_turns_the_summary_off(tmp_path):
    proc = cli("fit", *QUICK, f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_epochs=1",
               "--trainer.enable_model_summary=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Trainable params" not in proc.stdout + proc.stderr
