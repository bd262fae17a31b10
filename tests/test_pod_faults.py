"""Fail in the first minutes, not hours in: an unwritable workdir, a full disk during a save, the GAN step's compile
and memory check at start-up, and the entry point's exit codes (launch/supervise.sh restarts on some, not others)."""

import os
import subprocess
import sys
import time

import pytest

from train_helpers import micro_config
from unitok_jax import distributed
from unitok_jax import main as entry
from unitok_jax.train import checkpointing, trainer

pytestmark = pytest.mark.slow  # trains or compiles train steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PY = os.path.join(REPO, "tests", "reliability_config.py")


def _mount(args, target):
    try:
        subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount here (needs root): {e}")


@pytest.fixture
def small_disk(tmp_path):
    """A 7 MiB tmpfs: room for the micro model's first checkpoint (5.2 MiB with the GAN), not for the second."""
    dst = tmp_path / "small"
    dst.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=7m", "tmpfs"], dst)
    try:
        yield dst
    finally:
        subprocess.run(["umount", str(dst)], check=False, capture_output=True)


def test_should_initialize_distributed():
    assert distributed.should_initialize(None, None, {}, tpu_chips=4)  # any Cloud TPU VM: JAX auto-detects
    assert not distributed.should_initialize(None, None, {}, tpu_chips=0)  # laptop / single GPU host
    assert distributed.should_initialize(None, None, {"SLURM_NTASKS": "4"}, tpu_chips=0)
    assert not distributed.should_initialize(None, None, {"SLURM_NTASKS": "1"}, tpu_chips=0)
    assert distributed.should_initialize(None, 2, {}, tpu_chips=0)
    assert distributed.should_initialize(None, None, {"TPU_WORKER_HOSTNAMES": "a,b"}, tpu_chips=0)
    assert not distributed.should_initialize(False, 2, {"SLURM_NTASKS": "4"}, tpu_chips=4)  # the flag wins
    assert distributed.should_initialize(True, None, {}, tpu_chips=0)


def test_read_only_workdir_exits_in_seconds_with_a_clear_message(read_only_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.time()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unitok_jax.main",
            f"--config={CONFIG_PY}:gan",
            f"--workdir={read_only_dir}/run",
            f"--config.data.data_dir={tmp_path}/data",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.time() - t0
    assert result.returncode == entry.EXIT_CODES["WorkdirError"], result.stderr[-3000:]
    assert "is not writable" in result.stderr and "Read-only file system" in result.stderr
    assert "Traceback" not in result.stderr
    assert "compiled" not in result.stdout  # nothing was compiled
    assert seconds < 120, seconds  # the interpreter and JAX import dominate; no model is even built


def _config(tmp_path):
    """tests/test_trainer.py's config exactly (GAN from step 2 of 4): its compiled steps come from the shared cache."""
    config = micro_config(tmp_path, gan=True, steps=4)
    config.loss.gan_start = 2.0
    return config


def test_full_disk_during_a_save_stops_naming_the_last_good_step(small_disk, tmp_path):
    config = _config(tmp_path)
    config.async_checkpointing = True
    config.image_every_steps = 1000
    with pytest.raises(checkpointing.CheckpointSaveError) as info:
        trainer.train(config, str(small_disk / "run"))
    message = str(info.value)
    assert "newest committed checkpoint is step" in message, message
    last_good = int(message.split("newest committed checkpoint is step ")[1].split()[0])
    committed = sorted(int(d) for d in os.listdir(small_disk / "run" / "checkpoints") if d.isdigit())
    assert last_good in committed and last_good < 4


def test_every_step_variant_compiles_before_step_one_and_memory_is_checked(tmp_path, capfd):
    config = _config(tmp_path)  # steps 0-1 without the GAN, 2-3 with it: both variants are needed
    config.device_memory_limit_gib = 1e-4  # a budget no step fits: refused before any step runs
    with pytest.raises(trainer.StepMemoryError, match="grad_accum_steps") as info:
        trainer.train(config, str(tmp_path / "run"))
    assert "GiB per device but the device has" in str(info.value)
    out = capfd.readouterr().out
    assert "compiled the step without GAN" in out and "step 1/" not in out

    config.device_memory_limit_gib = 0.0
    summary = trainer.train(config, str(tmp_path / "run2"))
    out = capfd.readouterr().out
    assert summary["final_step"] == 4
    assert out.index("compiled the GAN step") < out.index("step 1/4")  # the GAN step compiled at start-up
