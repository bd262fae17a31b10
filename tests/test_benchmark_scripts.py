"""The benchmark scripts start with their documented defaults (the numbers themselves are measured by hand and
recorded in benchmarks/RESULTS.md, never asserted here)."""

import subprocess
import sys

from train_helpers import ROOT


def test_aot_memory_starts_with_its_defaults():
    """It used to crash at once ('set the device count before importing jax'): defining --config loads the default
    config file, which imports jax, before the device count was set."""
    result = subprocess.run(
        [sys.executable, "benchmarks/aot_memory.py", "--helpshort"],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out[-3000:]
    assert "--num_devices" in out and "--per_device_batch" in out  # absl printed the flags (it exits 1 after help)
