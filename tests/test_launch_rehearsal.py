"""launch/local_cpu_rehearsal.sh as written, with the real trainer: 2 `jax.distributed` processes x 4 CPU devices
under launch/supervise.sh. A SIGKILL of one process stops the group and the supervisor restarts it from the newest
checkpoint; a SIGTERM to ONE process (a preemption notice reaches one host) makes both processes checkpoint at the
same step and exit 0 (JAX's preemption sync point; no monkeypatch); a rerun resumes from that checkpoint. Every
logged loss of the interrupted run equals the uninterrupted single-process run's, and so do the final params."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import multiprocess_config
from unitok_jax.train import trainer
from unitok_jax.train.checkpointing import restore_params_only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "local_cpu_rehearsal.sh")
CONFIG = os.path.abspath(multiprocess_config.__file__)


def _wait_for(predicate, what: str, timeout: float, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the rehearsal ended (rc {proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _read(path) -> str:
    return open(path).read() if os.path.exists(path) else ""


def _pid_of(workdir: str, rank: int) -> int:
    out = subprocess.run(["pgrep", "-f", f"unitok_jax.main .*--workdir={workdir} .*--process_id={rank}$"],
                         capture_output=True, text=True).stdout.split()
    assert out, f"no process {rank} found"
    return int(out[0])


def _committed(workdir) -> list[int]:
    ckpts = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit() and
                  os.path.exists(os.path.join(ckpts, d, "commit_success.txt"))) if os.path.isdir(ckpts) else []


@pytest.mark.slow
def test_rehearsal_restarts_after_a_kill_and_checkpoints_on_sigterm(tmp_path):
    workdir, data_dir, logs = str(tmp_path / "run"), str(tmp_path / "data"), tmp_path / "logs"
    env = dict(os.environ, PYTHON=sys.executable, LOGDIR=str(logs), RESTART_DELAY_S="1", MAX_RESTARTS="3",
               NO_RESTART_CODES="2 3 4 5 7")
    args = [SCRIPT, f"--config={CONFIG}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
    p0_log = logs / "p0.log"

    # Leg 1: run "forever"; kill -9 process 1 once a checkpoint is committed and a later step has run.
    proc = subprocess.Popen(args + ["--config.total_steps=1000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(lambda: _committed(workdir) and "step 3/1000" in _read(p0_log), "step 3 and a checkpoint", 900, proc)
        os.kill(_pid_of(workdir, 1), signal.SIGKILL)
        # The group is stopped and restarted; the new attempt resumes from a checkpoint and trains on.
        _wait_for(lambda: _read(p0_log).count("resumed from") == 1, "the restarted group's resume", 900, proc)
        resumed_at = int(_read(p0_log).split("resumed from")[1].split("at step ")[1].split(";")[0])
        _wait_for(lambda: f"step {resumed_at + 2}/1000" in _read(p0_log), "two steps after the restart", 900, proc)
        # A preemption notice to one host only: both stop at the same step, checkpoint, exit 0; no restart.
        os.kill(_pid_of(workdir, 1), signal.SIGTERM)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-4000:] + _read(p0_log)[-4000:]
    assert "restart" in output  # the supervisor's line about the killed attempt
    p0, p1 = _read(p0_log), _read(logs / "p1.log")
    preempted_at = int(p0.split("preempted at step ")[1].split(":")[0])
    assert "checkpoint written" in p0.split("preempted at step ")[1].splitlines()[0]
    assert preempted_at in _committed(workdir) and preempted_at > resumed_at
    assert "preempted" not in p1  # console lines come from process 0 only, but process 1 also exited 0

    # Leg 2: rerun to two steps past the preemption checkpoint: resumes there and finishes.
    final = preempted_at + 2
    result = subprocess.run(args + [f"--config.total_steps={final}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"at step {preempted_at}" in _read(p0_log).split("=== ")[-1]

    # Uninterrupted reference: one process, 8 devices, same config (constant LR: total_steps does not change it).
    config = multiprocess_config.get_config()
    config.data.data_dir = data_dir
    config.total_steps = final
    ref_dir = str(tmp_path / "reference")
    trainer.train(config, ref_dir)
    rows = {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}
    ref = {r["step"]: r for r in map(json.loads, open(os.path.join(ref_dir, "metrics.jsonl")))}
    assert sorted(rows) == list(range(1, final + 1))  # one row per step despite the kill
    for step in ref:
        for key in ("train/loss/l2", "train/loss/vq", "train/loss/clip"):
            assert rows[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-6), (step, key)
    got, want = restore_params_only(workdir), restore_params_only(ref_dir)
    for (path, a), (_, b) in zip(*(sorted(_flat(t).items()) for t in (got, want))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=path)


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
