"""bench/memory.py: the peak PSS of a command counts its child processes too (a run's data-loader workers)."""
import sys

import pytest

from bench.memory import run_with_peak_pss, supported

pytestmark = pytest.mark.skipif(not supported(), reason="needs /proc/<pid>/smaps_rollup (Linux)")

HOLD = "import time; b = bytearray({mb} * 2 ** 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(3)"  # 6 samples at 0.5 s, even on a busy machine


def test_peak_pss_sums_a_command_and_its_child_processes():
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {HOLD.format(mb=300)!r}])"
    parent = f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {child!r}]); " \
             + HOLD.format(mb=100) + "; p.wait()"
    proc, peak = run_with_peak_pss([sys.executable, "-c", parent])
    assert proc.returncode == 0
    assert 400 <= peak / 2 ** 20 < 600  # 100 MB in the parent + 300 MB in the grandchild, plus interpreters


def test_a_failing_command_reports_its_exit_status():
    proc, peak = run_with_peak_pss([sys.executable, "-c", "raise SystemExit(3)"])
    assert proc.returncode == 3 and peak is not None
