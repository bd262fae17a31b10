"""Multi-host on one machine, with the real trainer and the launch scripts as written.

`launch/local_cpu_rehearsal.sh` runs 2 `jax.distributed` processes x 4 CPU devices (gloo) under
`launch/supervise.sh`. The run is SIGKILLed in one process (the group is stopped and restarted from the newest
checkpoint), then one process gets SIGTERM, as when a preemption notice reaches one host (both stop at the same step
through JAX's preemption sync point, checkpoint and exit 0; no monkeypatch), and a rerun finishes it. The same
checkpoints then resume elastically: the 2-process one in 1 process, an 8-device one on 4 devices. Every logged loss
and the final params match one uninterrupted process driving all 8 devices.

Why not bit-identical: each process reads its own interleaved share of the global example order
(`pipeline.make_train_loader`: `ds[process_index::process_count]`), so the global batch holds the same 8 examples
in a different row order ([0,2,4,6 | 1,3,5,7] instead of [0..7]). Every loss is a mean over the batch and the
CLIP labels follow the rows, so only the floating-point summation order changes; the params agree to ~1e-6
(tolerance below). The GAN is off in this config because DiffAug draws per-row augmentations.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multiprocess_config
from unitok_jax.train import trainer
from unitok_jax.train.checkpointing import restore_params_only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "local_cpu_rehearsal.sh")
CONFIG = os.path.abspath(multiprocess_config.__file__)
FINAL = 10  # steps of the uninterrupted reference; the interrupted run ends there too (constant LR: same updates)
# Param tolerance: the row order (hence summation order) differs between 1 and 2 processes, and AdamW turns a
# near-zero gradient's rounding difference into a full-size update of either sign; over 16 steps one of 192 text
# biases drifted 2.05e-5 apart (the losses stayed within 1e-4). 5e-5 absolute is a tenth of one step at lr 5e-4.
PARAM_ATOL = 5e-5


def _read(path) -> str:
    return open(path).read() if os.path.exists(path) else ""


def _wait_for(predicate, what: str, proc, timeout: float = 900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the rehearsal ended (rc {proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _pid_of(workdir: str, rank: int) -> int:
    out = subprocess.run(
        ["pgrep", "-f", f"unitok_jax.main .*--workdir={workdir} .*--process_id={rank}$"], capture_output=True, text=True
    ).stdout.split()
    assert out, f"no process {rank} found"
    return int(out[0])


def _committed(workdir) -> list[int]:
    ckpts = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpts):
        return []
    return sorted(
        int(d)
        for d in os.listdir(ckpts)
        if d.isdigit() and os.path.exists(os.path.join(ckpts, d, "commit_success.txt"))
    )


def _params(workdir, step):
    params = restore_params_only(os.path.join(workdir, "checkpoints", str(step)), None)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_matches_reference(workdir, ref_dir, first_step: int = 1):
    """Logged losses from `first_step` on and the final params equal the uninterrupted run's."""
    rows = {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}
    ref = {r["step"]: r for r in map(json.loads, open(os.path.join(ref_dir, "metrics.jsonl")))}
    assert sorted(rows) == list(range(1, FINAL + 1))  # one row per step, despite kills and resumes
    for step in range(first_step, FINAL + 1):
        for key in ("train/loss/l2", "train/loss/vq", "train/loss/clip"):
            assert rows[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-6), (workdir, step, key)
    got, want = _params(workdir, FINAL), _params(ref_dir, FINAL)
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=PARAM_ATOL, err_msg=k)


@pytest.mark.slow
def test_rehearsal_kill_preemption_and_elastic_resume_match_one_process(tmp_path):
    data_dir, logs = str(tmp_path / "data"), tmp_path / "logs"

    # Reference: this process, all 8 devices, uninterrupted (also generates the embedded dataset once).
    config = multiprocess_config.get_config()
    config.data.data_dir = data_dir
    config.total_steps = FINAL
    ref_dir = str(tmp_path / "reference")
    trainer.train(config, ref_dir)

    workdir = str(tmp_path / "run")
    env = dict(os.environ, PYTHON=sys.executable, LOGDIR=str(logs), RESTART_DELAY_S="1", MAX_RESTARTS="3")
    args = [SCRIPT, f"--config={CONFIG}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
    p0_log = logs / "p0.log"

    # Leg 1 runs "forever": SIGKILL process 1 once a checkpoint is committed and step 3 ran.
    proc = subprocess.Popen(
        args + ["--config.total_steps=1000"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: _committed(workdir) and "step 3/1000" in _read(p0_log), "step 3 and a checkpoint", proc)
        os.kill(_pid_of(workdir, 1), signal.SIGKILL)
        # The group is stopped and restarted; the new attempt resumes from a checkpoint and trains on.
        _wait_for(lambda: "resumed from" in _read(p0_log), "the restarted group's resume", proc)
        resumed_at = int(_read(p0_log).split("resumed from")[1].split("at step ")[1].split(";")[0])
        _wait_for(lambda: f"step {resumed_at + 2}/1000" in _read(p0_log), "two steps after the restart", proc)
        # A preemption notice to one host only: both stop at the same step, checkpoint, exit 0; no restart.
        os.kill(_pid_of(workdir, 1), signal.SIGTERM)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-4000:] + _read(p0_log)[-4000:]
    assert "restarting" in output  # the supervisor's line about the killed attempt
    p0 = _read(p0_log)
    preempted_at = int(p0.split("preempted at step ")[1].split(":")[0])
    assert "checkpoint written" in p0.split("preempted at step ")[1].splitlines()[0]
    assert resumed_at < preempted_at < FINAL and preempted_at in _committed(workdir)
    assert "[unitok_jax]" not in _read(logs / "p1.log")  # console output only from process 0
    shutil.copytree(workdir, tmp_path / "elastic")  # the 2-process checkpoint, resumed below by 1 process

    # Leg 2: the same command with the final step count resumes at the preemption checkpoint and finishes.
    result = subprocess.run(
        args + [f"--config.total_steps={FINAL}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"at step {preempted_at}" in _read(p0_log).split("=== ")[-1]
    _assert_matches_reference(workdir, ref_dir)

    # Elastic resume, 2 processes -> 1: params and AdamW state are resharded onto this process's 8-device mesh and
    # the data continues at global example step * batch (Grain's per-process files are for 2 processes).
    elastic = str(tmp_path / "elastic")
    summary = trainer.train(config, elastic)
    assert summary["start_step"] == preempted_at
    _assert_matches_reference(elastic, ref_dir, first_step=preempted_at + 1)

    # Elastic resume, 8 devices -> 4: the reference's step-6 checkpoint continues in a process with 4 devices.
    fewer = tmp_path / "fewer_devices"
    shutil.copytree(ref_dir, fewer)
    for step in (8, 10):
        shutil.rmtree(fewer / "checkpoints" / str(step))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env4 = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"])
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unitok_jax.main",
            f"--config={CONFIG}",
            f"--workdir={fewer}",
            f"--config.data.data_dir={data_dir}",
            f"--config.total_steps={FINAL}",
        ],
        cwd=REPO,
        env=env4,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "at step 6" in result.stdout
    _assert_matches_reference(str(fewer), ref_dir, first_step=7)
