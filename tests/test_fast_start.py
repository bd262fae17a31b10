"""Fast start: the training entry point keeps compiled programs in a persistent cache by default (single process), so a rerun
or a resumed run does not compile for minutes again; 'none' turns it off; multi-process runs use the launcher's."""

import os
import subprocess
import sys

import pytest

from train_helpers import ROOT
from unitok_jax.main import compilation_cache_dir


def test_where_the_cache_goes():
    assert compilation_cache_dir("auto", {}, 1) == "~/.cache/unitok_jax/xla"
    assert compilation_cache_dir("auto", {"UNITOK_JAX_CACHE": "/c/"}, 1) == "/c/xla"
    assert (
        compilation_cache_dir("auto", {"JAX_COMPILATION_CACHE_DIR": "gs://b/run/jax_cache"}, 4)
        == "gs://b/run/jax_cache"
    )
    assert compilation_cache_dir("auto", {}, 2) is None  # multi-process: only what the launcher exports
    assert compilation_cache_dir("none", {"JAX_COMPILATION_CACHE_DIR": "/x"}, 1) is None
    assert compilation_cache_dir("/my/cache", {}, 1) == "/my/cache"


@pytest.mark.slow
def test_a_run_fills_the_default_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(UNITOK_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    config = os.path.join(ROOT, "tests", "multiprocess_config.py")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unitok_jax.main",
            f"--config={config}",
            f"--workdir={tmp_path / 'run'}",
            f"--config.data.data_dir={tmp_path / 'data'}",
            "--config.total_steps=1",
        ],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    entries = os.listdir(tmp_path / "cache" / "xla")
    assert entries, "no compiled program was written to the default cache"


def test_eta_is_timed_from_the_first_logged_step():
    """A slow first step (one-off costs) must not inflate the ETA: 2 h 08 min was predicted at step 1 of a 20-step
    run before; the rate now comes from the steps after the first line."""
    from unitok_jax.train.metric_writers import ProgressLine

    times = iter([100.0, 140.0])  # the first line at t=100 (after a slow first step), the last 20 steps later
    line = ProgressLine(total_steps=21, start_step=0, clock=lambda: next(times))
    assert line.format(1, {}).endswith("eta=…")
    assert line.format(21, {}).endswith("eta=0:00:00")  # the last step
    line = ProgressLine(total_steps=1000, start_step=0, clock=iter([10.0, 12.0]).__next__)
    line.format(1, {})
    assert line.format(2, {}).endswith("eta=0:33:16")  # 2 s per step x 998 steps
