"""Two `python -m unitok_jax.main` processes on CPU (4 fake devices each, gloo collectives, jax.distributed via
--coordinator_address/--num_processes/--process_id) train, checkpoint (Orbax, multi-host), resume, and end with
the same parameters as one process driving all 8 devices; the same checkpoints also resume elastically on another
process count (2 -> 1) and device count (8 -> 4).

Why not bit-identical: each process reads its own interleaved share of the global example order
(`pipeline.make_train_loader`: `ds[process_index::process_count]`), so the global batch holds the same 8 examples
in a different row order ([0,2,4,6 | 1,3,5,7] instead of [0..7]). Every loss is a mean over the batch and the
CLIP labels follow the rows, so only the floating-point summation order changes; after 4 AdamW steps the params
agree to ~1e-6 (tolerance below). The GAN is off in this config because DiffAug draws per-row augmentations.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multiprocess_config
from unitok_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.abspath(multiprocess_config.__file__)
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(cache_dir) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"  # the default on jax 0.10; explicit for older/newer ones
    # The resumed leg reuses the first leg's executables (as a production restart would).
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_processes(workdir, data_dir, total_steps: int, logs_dir, cache_dir, timeout: float = 1800) -> list[str]:
    """Launch the N processes of one run, wait for all; returns their stdouts (raises with logs on failure)."""
    port = _free_port()
    procs = []
    for i in range(NUM_PROCESSES):
        out = open(os.path.join(logs_dir, f"p{i}_{total_steps}.log"), "w")
        cmd = [sys.executable, "-m", "unitok_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", f"--config.total_steps={total_steps}",
               f"--coordinator_address=localhost:{port}", f"--num_processes={NUM_PROCESSES}", f"--process_id={i}"]
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=_env(cache_dir), stdout=out, stderr=subprocess.STDOUT), out))
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p, _ in procs):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p, _ in procs):
                break
            time.sleep(0.5)
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            out.close()
    logs = [open(out.name).read() for _, out in procs]
    if any(p.returncode != 0 for p, _ in procs):
        raise AssertionError("multi-process run failed:\n" + "\n".join(
            f"--- process {i} rc={p.returncode} ---\n{log[-4000:]}" for i, ((p, _), log) in enumerate(zip(procs, logs))))
    return logs


def _final_params(workdir, step):
    from unitok_jax.train.checkpointing import restore_params_only

    params = restore_params_only(os.path.join(workdir, "checkpoints", str(step)), None)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


@pytest.mark.slow
def test_two_processes_train_resume_and_match_one_process(tmp_path):
    data_dir, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    steps = multiprocess_config.TOTAL_STEPS

    # Reference: this process, all 8 devices, uninterrupted (also generates the embedded dataset once).
    config = multiprocess_config.get_config()
    config.data.data_dir = str(data_dir)
    ref_dir = str(tmp_path / "single")
    trainer.train(config, ref_dir)

    multi_dir = str(tmp_path / "multi")
    first = run_processes(multi_dir, data_dir, steps // 2, logs, tmp_path / "jax_cache")
    assert "started from scratch" in first[0]
    shutil.copytree(multi_dir, tmp_path / "elastic")  # the 2-process checkpoint, resumed below by 1 process
    second = run_processes(multi_dir, data_dir, steps, logs, tmp_path / "jax_cache")
    assert f"resumed from {os.path.join(multi_dir, 'checkpoints')} at step {steps // 2}" in second[0]
    assert "[unitok_jax]" not in second[1]  # console output only from process 0

    # Multi-host discipline: metrics written once (process 0), one record per step, sane values.
    records = [json.loads(line) for line in open(os.path.join(multi_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    ref_records = [json.loads(line) for line in open(os.path.join(ref_dir, "metrics.jsonl"))]
    for r, ref in zip(records, ref_records):
        for key in ("train/loss/l2", "train/loss/vq", "train/loss/clip"):
            assert r[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (r["step"], key)

    got, want = _final_params(multi_dir, steps), _final_params(ref_dir, steps)
    assert got.keys() == want.keys()
    worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in got)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5, err_msg=k)
    print(f"max |param difference| after {steps} steps: {worst:.2e}")

    # Elastic resume, 2 processes -> 1: the step-2 checkpoint written by two processes continues in this one process
    # (8 devices): params and AdamW state are resharded, and the data stream continues at global example
    # step * batch from the saved data position (Grain's per-process files are for 2 processes).
    elastic = str(tmp_path / "elastic")
    summary = trainer.train(config, elastic)
    assert summary["start_step"] == steps // 2
    _assert_continues_reference(elastic, ref_dir, ref_records, steps)

    # Elastic resume, 8 devices -> 4: the reference's step-2 checkpoint continues in a process with 4 devices.
    fewer = tmp_path / "fewer_devices"
    shutil.copytree(ref_dir, fewer)
    shutil.rmtree(fewer / "checkpoints" / str(steps))
    env = _env(tmp_path / "jax_cache")
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(f"device_count={DEVICES_PER_PROCESS}", "device_count=4")
    result = subprocess.run(
        [sys.executable, "-m", "unitok_jax.main", f"--config={CONFIG}", f"--workdir={fewer}",
         f"--config.data.data_dir={data_dir}", f"--config.total_steps={steps}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"at step {steps // 2}" in result.stdout
    _assert_continues_reference(str(fewer), ref_dir, ref_records, steps)


def _assert_continues_reference(workdir, ref_dir, ref_records, steps):
    """The resumed run's logged losses after the resume point and its final params match the uninterrupted run's."""
    records = {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}
    assert sorted(records) == list(range(1, steps + 1))  # rows past the resume point were dropped, then rewritten
    for ref in ref_records[steps // 2:]:
        for key in ("train/loss/l2", "train/loss/vq", "train/loss/clip"):
            assert records[ref["step"]][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (ref["step"], key)
    got, want = _final_params(workdir, steps), _final_params(ref_dir, steps)
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5, err_msg=k)
