"""The launch/ scripts: syntax, the supervised restart loop, kill-the-group, flag presets, and the SLURM / TPU pod
launchers driven through stand-ins for srun/scontrol/gcloud.

No training runs here (a separate end-to-end test runs the real trainer through launch/local_cpu_rehearsal.sh).
The commands under supervision are real processes: small bash scripts that fail, hang, ignore SIGTERM or exit
cleanly on it, and record what they were started with. The launchers call the trainer as
`$PYTHON -m unitok_jax.main ...`; `fake_python` below stands in for that interpreter (and runs the real python3
for `-c` snippets such as the free-port lookup).
"""

from __future__ import annotations

import concurrent.futures
import glob
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted(glob.glob(str(LAUNCH / "*.sh")) + glob.glob(str(LAUNCH / "*.sbatch")))

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stand-in for `python -m unitok_jax.main ...`: records its start, then behaves as $FAKE_BEHAVIOR says.
if [[ "${1:-}" == "-c" ]]; then exec "$FAKE_REAL_PYTHON" "$@"; fi
rank=-1
coord=""
for a in "$@"; do
  case $a in
    --process_id=*) rank=${a#--process_id=} ;;
    --coordinator_address=*) coord=${a#--coordinator_address=} ;;
  esac
done
if [[ "$rank" == '$SLURM_PROCID' || "$rank" == -1 ]]; then rank=${SLURM_PROCID:-0}; fi
attempt=${SUPERVISE_ATTEMPT:-0}
# Args and env first, each written whole (tmp + rename: on the fake TPU pod two workers share a rank), then the
# start line the tests wait for, so a test that saw the start never reads a half-written file.
printf '%s\n' "$@" > "$FAKE_OUT/args_${attempt}_${rank}.txt.$$" && mv "$FAKE_OUT/args_${attempt}_${rank}.txt.$$" "$FAKE_OUT/args_${attempt}_${rank}.txt"
env > "$FAKE_OUT/env_${attempt}_${rank}.txt.$$" && mv "$FAKE_OUT/env_${attempt}_${rank}.txt.$$" "$FAKE_OUT/env_${attempt}_${rank}.txt"
printf 'attempt=%s rank=%s pid=%s coord=%s\n' "$attempt" "$rank" "$$" "$coord" >> "$FAKE_OUT/starts.txt"
case "$FAKE_BEHAVIOR" in
  ok) sleep 0.3; exit 0 ;;
  crash_rank1_once)   # attempt 1: rank 1 crashes, rank 0 is stuck (ignores SIGTERM, like a process in a collective)
    if [[ "$attempt" == 1 ]]; then
      if [[ "$rank" == 1 ]]; then sleep 0.5; exit 1; fi
      trap '' TERM
      while :; do sleep 0.1; done
    fi
    exit 0 ;;
  wait_term)          # the trainer on SIGTERM: checkpoint, exit 0
    trap 'echo "rank $rank got SIGTERM" >> "$FAKE_OUT/terms.txt"; exit 0' TERM
    while :; do sleep 0.1; done ;;
  ignore_term)        # stuck: does not act on SIGTERM
    trap '' TERM
    while :; do sleep 0.1; done ;;
  fail) exit "${FAKE_EXIT:-1}" ;;
esac
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text) if not text.startswith("#!") else text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake(tmp_path):
    """A folder with the stand-in python; the env the launchers need to use it."""
    out = tmp_path / "out"
    out.mkdir()
    py = _write_exe(tmp_path / "fake_python", FAKE_PYTHON)
    env = dict(
        os.environ,
        PYTHON=str(py),
        FAKE_OUT=str(out),
        FAKE_REAL_PYTHON=sys.executable,
        RESTART_DELAY_S="0",
        GROUP_KILL_GRACE_S="1",
    )
    for k in (
        "XLA_FLAGS",
        "LIBTPU_INIT_ARGS",
        "JAX_COMPILATION_CACHE_DIR",
        "MAX_RESTARTS",
        "NO_RESTART_CODES",
        "PRESET",
        "SUPERVISE_ATTEMPT",
        "NCCL_DEBUG",
    ):
        env.pop(k, None)
    return out, py, env


def _starts(out: Path) -> list[dict]:
    path = out / "starts.txt"
    if not path.exists():
        return []
    return [dict(kv.split("=", 1) for kv in line.split()) for line in path.read_text().splitlines()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says it is gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------------------------- syntax


@pytest.mark.parametrize("script", SCRIPTS, ids=[os.path.basename(s) for s in SCRIPTS])
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", script], check=True)


def test_every_script_is_checked_and_executable():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {
        "supervise.sh",
        "process_group.sh",
        "local_cpu_rehearsal.sh",
        "tpu_pod.sh",
        "tpu_worker.sh",
        "gpu_single_host.sh",
        "slurm_multinode.sbatch",
        "xla_flags.sh",
        "common.sh",
    } <= names
    for name in (
        "supervise.sh",
        "process_group.sh",
        "local_cpu_rehearsal.sh",
        "tpu_pod.sh",
        "tpu_worker.sh",
        "gpu_single_host.sh",
        "slurm_multinode.sbatch",
    ):
        assert os.access(LAUNCH / name, os.X_OK), name


# --------------------------------------------------------------------------------------------------- supervise.sh


def _flaky(tmp_path: Path, failures: int, code: int = 1) -> tuple[Path, Path]:
    counter = tmp_path / "count"
    script = _write_exe(
        tmp_path / "flaky.sh",
        f"""\
        #!/usr/bin/env bash
        n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 ))
        echo $n > {counter}
        echo "run $n attempt=$SUPERVISE_ATTEMPT" >> {tmp_path / 'runs.txt'}
        if (( n <= {failures} )); then exit {code}; fi
        exit 0
        """,
    )
    return script, counter


def test_supervise_restarts_until_success(tmp_path, fake):
    _, _, env = fake
    script, counter = _flaky(tmp_path, failures=2)
    proc = subprocess.run([LAUNCH / "supervise.sh", script], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert counter.read_text().strip() == "3"
    assert (tmp_path / "runs.txt").read_text().split("\n")[:3] == [
        "run 1 attempt=1",
        "run 2 attempt=2",
        "run 3 attempt=3",
    ]
    assert "attempt 1 exited with code 1" in proc.stderr and "attempt 2 exited with code 1" in proc.stderr
    assert "restart 1/100" in proc.stderr and "attempt 3 finished with exit code 0" in proc.stderr


def test_supervise_gives_up_after_max_restarts(tmp_path, fake):
    _, _, env = fake
    script, counter = _flaky(tmp_path, failures=100, code=9)
    proc = subprocess.run(
        [LAUNCH / "supervise.sh", script], env=dict(env, MAX_RESTARTS="2"), capture_output=True, text=True, timeout=20
    )
    assert proc.returncode == 9
    assert counter.read_text().strip() == "3"  # the first attempt + 2 restarts
    assert "MAX_RESTARTS=2 reached, giving up" in proc.stderr


def test_supervise_gives_up_on_repeated_start_up_failures(tmp_path, fake):
    _, _, env = fake
    script, counter = _flaky(tmp_path, failures=100, code=1)  # e.g. a typo in a flag: absl exits 1 at once
    proc = subprocess.run(
        [LAUNCH / "supervise.sh", script],
        env=dict(env, MAX_QUICK_FAILURES="3"),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 1 and counter.read_text().strip() == "3"
    assert "3 attempts in a row failed within 60 s" in proc.stderr


def test_supervise_does_not_restart_permanent_errors(tmp_path, fake):
    _, _, env = fake
    script, counter = _flaky(tmp_path, failures=100, code=2)  # unitok_jax.main's ConfigError
    proc = subprocess.run([LAUNCH / "supervise.sh", script], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and counter.read_text().strip() == "1"
    assert "NO_RESTART_CODES" in proc.stderr
    # ...unless told to restart on every code.
    counter.unlink()
    proc = subprocess.run(
        [LAUNCH / "supervise.sh", script],
        env=dict(env, NO_RESTART_CODES="", MAX_RESTARTS="1"),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 2 and counter.read_text().strip() == "2"


def test_supervise_forwards_sigterm_and_does_not_restart(tmp_path, fake):
    out, py, env = fake
    sup = subprocess.Popen(
        [LAUNCH / "supervise.sh", py, "-m", "unitok_jax.main"],
        env=dict(env, FAKE_BEHAVIOR="wait_term"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(lambda: len(_starts(out)) == 1)
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=10)
    assert sup.returncode == 0, err  # the command checkpointed and exited 0
    assert (out / "terms.txt").read_text().strip() == "rank 0 got SIGTERM"
    assert len(_starts(out)) == 1 and "will not restart" in err


def test_supervise_stopped_while_backing_off(tmp_path, fake):
    _, _, env = fake
    script, counter = _flaky(tmp_path, failures=100, code=1)
    sup = subprocess.Popen(
        [LAUNCH / "supervise.sh", script],
        env=dict(env, RESTART_DELAY_S="60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(lambda: counter.exists())
    time.sleep(0.3)  # now in the 60 s back-off
    t0 = time.time()
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=10)
    assert time.time() - t0 < 5
    assert sup.returncode == 1 and counter.read_text().strip() == "1"
    assert "while waiting to restart" in err


def test_supervise_killed_child_is_restarted(tmp_path, fake):
    """A command killed from outside (OOM killer, kill -9) is a crash: restarted."""
    out, py, env = fake
    sup = subprocess.Popen(
        [LAUNCH / "supervise.sh", py, "-m", "unitok_jax.main"],
        env=dict(env, FAKE_BEHAVIOR="wait_term", MAX_RESTARTS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(lambda: len(_starts(out)) == 1)
    os.kill(int(_starts(out)[0]["pid"]), signal.SIGKILL)
    assert _wait_for(lambda: len(_starts(out)) == 2)
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=10)
    assert "attempt 1 exited with code 137" in err
    assert sup.returncode == 0


# --------------------------------------------------------------------------------------------------- rehearsal


def test_rehearsal_kills_the_group_and_restarts_it(tmp_path, fake):
    """Rank 1 crashes; rank 0 hangs ignoring SIGTERM (like a process blocked in a collective). The group is torn
    down (rank 0 SIGKILLed after the grace period) and restarted as a whole on a new coordinator port."""
    out, _, env = fake
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            LAUNCH / "local_cpu_rehearsal.sh",
            "--config=configs/unitok.py:tiny",
            f"--workdir={workdir}",
            "--config.total_steps=20",
        ],
        env=dict(
            env,
            NPROC="2",
            DEVICES="3",
            LOGDIR=str(tmp_path / "logs"),
            FAKE_BEHAVIOR="crash_rank1_once",
            XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false",
        ),
        capture_output=True,
        text=True,
        timeout=25,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    starts = _starts(out)
    assert sorted((s["attempt"], s["rank"]) for s in starts) == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    first = [s for s in starts if s["attempt"] == "1"]
    assert not any(_alive(int(s["pid"])) for s in first)
    assert "rank 1 (pid" in proc.stderr and "exited with code 1: stopping the other member(s)" in proc.stderr
    assert "still running 1 s after SIGTERM: sent SIGKILL" in proc.stderr
    assert "attempt 1 exited with code 1" in proc.stderr
    # Every member of an attempt shares one coordinator; a restart uses a new port.
    ports = {a: {s["coord"] for s in starts if s["attempt"] == a} for a in ("1", "2")}
    assert all(len(p) == 1 for p in ports.values()) and ports["1"] != ports["2"]
    # The command line and environment of a member.
    args = (out / "args_2_1.txt").read_text().splitlines()
    assert args[:2] == ["-m", "unitok_jax.main"] and "--num_processes=2" in args and "--process_id=1" in args
    member_env = dict(line.split("=", 1) for line in (out / "env_2_1.txt").read_text().splitlines() if "=" in line)
    assert member_env["JAX_PLATFORMS"] == "cpu" and member_env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert member_env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3"
    assert "JAX_COMPILATION_CACHE_DIR" not in member_env  # off by default on multi-process CPU (see the script)
    # Logs appended per attempt, rank 0 also on the console.
    log1 = (tmp_path / "logs" / "p1.log").read_text()
    assert log1.count("=== ") == 2 and "attempt 2:" in log1


def test_rehearsal_group_failure_without_restart_exits_nonzero(tmp_path, fake):
    out, _, env = fake
    proc = subprocess.run(
        [LAUNCH / "local_cpu_rehearsal.sh", "--config=x", f"--workdir={tmp_path / 'run'}"],
        env=dict(env, NPROC="3", LOGDIR=str(tmp_path / "logs"), FAKE_BEHAVIOR="crash_rank1_once", MAX_RESTARTS="0"),
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
    )
    assert proc.returncode == 1
    starts = _starts(out)
    assert len(starts) == 3 and not any(_alive(int(s["pid"])) for s in starts)
    assert "exit codes by rank: 137 1 137" in proc.stderr  # ranks 0 and 2 were stuck and SIGKILLed


def test_rehearsal_sigterm_stops_every_member_cleanly(tmp_path, fake):
    out, _, env = fake
    launcher = subprocess.Popen(
        [LAUNCH / "local_cpu_rehearsal.sh", "--config=x", f"--workdir={tmp_path / 'run'}"],
        env=dict(env, NPROC="2", LOGDIR=str(tmp_path / "logs"), FAKE_BEHAVIOR="wait_term"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert _wait_for(lambda: len(_starts(out)) == 2)
    # A second launcher on the same workdir is refused while the first one's processes run.
    second = subprocess.run(
        [LAUNCH / "local_cpu_rehearsal.sh", "--config=x", "--workdir", str(tmp_path / "run")],
        env=dict(env, NPROC="2", LOGDIR=str(tmp_path / "logs2"), FAKE_BEHAVIOR="ok"),
        capture_output=True,
        text=True,
        timeout=10,
        cwd=REPO,
    )
    assert second.returncode == 73 and "still using --workdir" in second.stderr
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=15)
    assert launcher.returncode == 0, err
    assert sorted((out / "terms.txt").read_text().splitlines()) == ["rank 0 got SIGTERM", "rank 1 got SIGTERM"]
    assert len(_starts(out)) == 2  # no restart


def test_rehearsal_second_sigterm_kills_stuck_members(tmp_path, fake):
    out, _, env = fake
    launcher = subprocess.Popen(
        [LAUNCH / "local_cpu_rehearsal.sh", "--config=x", f"--workdir={tmp_path / 'run'}"],
        env=dict(env, NPROC="2", LOGDIR=str(tmp_path / "logs"), FAKE_BEHAVIOR="ignore_term"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert _wait_for(lambda: len(_starts(out)) == 2)
    pids = [int(s["pid"]) for s in _starts(out)]
    launcher.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert launcher.poll() is None and all(_alive(p) for p in pids)  # waiting for the members to checkpoint
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=10)
    assert launcher.returncode == 137, err
    assert not any(_alive(p) for p in pids) and "sending SIGKILL to 2 member(s)" in err
    assert len(_starts(out)) == 2


def test_gpu_per_gpu_mode_process_ids(tmp_path, fake):
    out, _, env = fake
    proc = subprocess.run(
        [LAUNCH / "gpu_single_host.sh", "--config=x", f"--workdir={tmp_path / 'run'}"],
        env=dict(
            env,
            MODE="per_gpu",
            GPUS="2",
            NUM_HOSTS="2",
            HOST_INDEX="1",
            COORDINATOR="host0:1234",
            LOGDIR=str(tmp_path / "logs"),
            FAKE_BEHAVIOR="ok",
        ),
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    starts = sorted(_starts(out), key=lambda s: s["rank"])
    assert [(s["rank"], s["coord"]) for s in starts] == [("2", "host0:1234"), ("3", "host0:1234")]
    args = (out / "args_1_3.txt").read_text().splitlines()
    assert "--local_device_ids=1" in args and "--num_processes=4" in args
    member_env = dict(line.split("=", 1) for line in (out / "env_1_3.txt").read_text().splitlines() if "=" in line)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in member_env["XLA_FLAGS"]


# --------------------------------------------------------------------------------------------------- flag presets


def _source_preset(preset: str, **env) -> dict:
    script = f'set -euo pipefail; PRESET={preset} source {LAUNCH / "xla_flags.sh"}; env -0'
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "NCCL_DEBUG")}
    out = subprocess.run(["bash", "-c", script], env=dict(base, **env), capture_output=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def test_presets_append_and_keep_user_flags():
    gpu = _source_preset(
        "gpu", XLA_FLAGS="--xla_gpu_enable_pipelined_all_gather=false --xla_dump_to=/tmp/x*", NCCL_DEBUG="INFO"
    )
    flags = gpu["XLA_FLAGS"].split()
    assert flags[:2] == ["--xla_gpu_enable_pipelined_all_gather=false", "--xla_dump_to=/tmp/x*"]
    assert "--xla_gpu_enable_pipelined_all_gather=true" not in flags
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert len({f.split("=")[0] for f in flags}) == len(flags)
    assert gpu["NCCL_DEBUG"] == "INFO"  # set by the user: kept

    tpu = _source_preset("tpu")
    assert "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true" in tpu["LIBTPU_INIT_ARGS"].split()
    assert "--xla_tpu_enable_data_parallel_all_reduce_opt=true" in tpu["LIBTPU_INIT_ARGS"].split()
    assert "XLA_FLAGS" not in tpu
    assert "XLA_FLAGS" not in _source_preset("none") and "LIBTPU_INIT_ARGS" not in _source_preset("none")
    # Sourcing twice adds nothing.
    twice = subprocess.run(
        ["bash", "-c", f"PRESET=gpu; source {LAUNCH}/xla_flags.sh; source {LAUNCH}/xla_flags.sh; echo $XLA_FLAGS"],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    ).stdout.split()
    assert len(twice) == len(set(twice)) == 11
    bad = subprocess.run(["bash", "-c", f"PRESET=tpuu; source {LAUNCH}/xla_flags.sh"], capture_output=True, text=True)
    assert bad.returncode == 64 and "unknown PRESET" in bad.stderr


def test_gpu_preset_flags_are_known_to_the_installed_jaxlib(monkeypatch):
    """An unknown XLA flag aborts every process at start-up. XLA's flag registry is shared by all backends, so the
    GPU preset's names are checked here with the CPU backend (launch/check_xla_flags.py); a removed flag must be
    reported. The two probes (each a child python importing jax) run side by side."""
    spec = importlib.util.spec_from_file_location("check_xla_flags", LAUNCH / "check_xla_flags.py")
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    flags = _source_preset("gpu")["XLA_FLAGS"]
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(checker.check_xla_flags, flags)
        bad = pool.submit(checker.check_xla_flags, flags + " --xla_gpu_graph_level=0")  # removed from XLA
        (good_ok, good_msg), (bad_ok, bad_msg) = good.result(timeout=120), bad.result(timeout=120)
    assert good_ok, good_msg
    assert not bad_ok and "--xla_gpu_graph_level" in bad_msg and "xla_gpu_enable" not in bad_msg


# --------------------------------------------------------------------------------------------------- SLURM


FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in for srun: runs the command once per task (SLURM_PROCID=i), forwards SIGTERM, returns the highest code.
echo "srun $*" >> "$FAKE_OUT/srun_calls.txt"
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for p in "${pids[@]}"; do
  while :; do
    c=0; wait "$p" || c=$?
    if kill -0 "$p" 2>/dev/null; then continue; fi
    break
  done
  (( c > rc )) && rc=$c
done
exit $rc
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_OUT/scontrol_calls.txt"
if [[ "$1 $2" == "show hostnames" ]]; then echo node-a; echo node-b; fi
"""


def _slurm_env(tmp_path, env, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _write_exe(bin_dir / "srun", FAKE_SRUN)
    _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    return dict(
        env,
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="2",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_SUBMIT_DIR=str(REPO),
        **extra,
    )


def test_slurm_script_runs_every_task_with_its_rank(tmp_path, fake):
    out, _, env = fake
    proc = subprocess.run(
        [
            LAUNCH / "slurm_multinode.sbatch",
            "--config=x",
            "--workdir=/shared/run dir",
            "--config.data.train_files=/d/*.array_record",
        ],
        env=_slurm_env(tmp_path, env, FAKE_BEHAVIOR="ok"),
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    starts = sorted(_starts(out), key=lambda s: s["rank"])
    port = 20000 + 4242 % 20000 + 1  # attempt 1
    assert [(s["rank"], s["coord"]) for s in starts] == [("0", f"node-a:{port}"), ("1", f"node-a:{port}")]
    args = (out / "args_1_1.txt").read_text().splitlines()
    assert "--workdir=/shared/run dir" in args and "--config.data.train_files=/d/*.array_record" in args
    assert "--num_processes=2" in args and "--process_id=1" in args
    member_env = dict(line.split("=", 1) for line in (out / "env_1_0.txt").read_text().splitlines() if "=" in line)
    assert member_env["JAX_COMPILATION_CACHE_DIR"] == "/shared/run dir/jax_cache"
    assert "--xla_gpu_enable_pipelined_reduce_scatter=true" in member_env["XLA_FLAGS"]
    assert "--kill-on-bad-exit=1" in (out / "srun_calls.txt").read_text()
    assert not (out / "scontrol_calls.txt").read_text().count("requeue")


def test_slurm_time_limit_signal_checkpoints_and_requeues(tmp_path, fake):
    out, _, env = fake
    job = subprocess.Popen(
        [LAUNCH / "slurm_multinode.sbatch", "--config=x", "--workdir=/shared/run"],
        env=_slurm_env(tmp_path, env, FAKE_BEHAVIOR="wait_term"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert _wait_for(lambda: len(_starts(out)) == 2)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends before the time limit
    stdout, stderr = job.communicate(timeout=15)
    assert job.returncode == 0, stdout + stderr
    assert sorted((out / "terms.txt").read_text().splitlines()) == ["rank 0 got SIGTERM", "rank 1 got SIGTERM"]
    assert "scontrol requeue 4242" in (out / "scontrol_calls.txt").read_text()
    assert len(_starts(out)) == 2  # not restarted inside the allocation


# --------------------------------------------------------------------------------------------------- TPU pod


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stand-in for `gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=W --command=CMD`: runs CMD with bash in a
# home folder per fake worker.
echo "gcloud $*" >> "$FAKE_OUT/gcloud_calls.txt"
worker=""; cmd=""
for a in "$@"; do case $a in --worker=*) worker=${a#--worker=} ;; --command=*) cmd=${a#--command=} ;; esac; done
if [[ $worker == all ]]; then workers="0 1"; else workers=$worker; fi
for w in $workers; do
  (cd "$FAKE_HOMES/w$w" && HOME="$FAKE_HOMES/w$w" bash -c "$cmd")
done
"""


def test_tpu_pod_start_status_stop_through_ssh(tmp_path, fake):
    """SETUP=0 start on two fake workers: each runs launch/tpu_worker.sh detached, with --distributed, the TPU
    preset and the cache in the workdir; ACTION=stop sends SIGTERM to each supervisor."""
    out, py, env = fake
    homes = tmp_path / "homes"
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(py)
    for w in (0, 1):
        (homes / f"w{w}").mkdir(parents=True)
        (homes / f"w{w}" / "unitok_jax").symlink_to(REPO)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
    run_env = dict(
        env,
        PATH=f"{bin_dir}:{env['PATH']}",
        FAKE_HOMES=str(homes),
        FAKE_BEHAVIOR="wait_term",
        TPU_NAME="pod",
        ZONE="zone-a",
        PROJECT="proj",
        VENV=str(tmp_path / "venv"),
        SETUP="0",
        WORKDIR="gs://bucket/run",
        MAX_RESTARTS="0",
    )

    def pod(action, *args):
        return subprocess.run(
            [LAUNCH / "tpu_pod.sh", *args],
            env=dict(run_env, ACTION=action),
            capture_output=True,
            text=True,
            timeout=20,
            cwd=tmp_path,
        )

    started = pod("start", "--config=configs/unitok.py:paper", "--config.data.train_files=/mnt/data/a b/*.ar")
    assert started.returncode == 0, started.stdout + started.stderr
    assert _wait_for(lambda: len(_starts(out)) == 2)
    calls = (out / "gcloud_calls.txt").read_text()
    assert "--zone=zone-a" in calls and "--project=proj" in calls and "--worker=all" in calls
    args = (out / "args_1_0.txt").read_text().splitlines()
    assert args[:4] == ["-m", "unitok_jax.main", "--distributed", "--workdir=gs://bucket/run"]
    assert args[-1] == "--config.data.train_files=/mnt/data/a b/*.ar"
    member_env = dict(line.split("=", 1) for line in (out / "env_1_0.txt").read_text().splitlines() if "=" in line)
    assert member_env["JAX_COMPILATION_CACHE_DIR"] == "gs://bucket/run/jax_cache"
    assert "--xla_tpu_overlap_compute_collective_tc=true" in member_env["LIBTPU_INIT_ARGS"]

    status = pod("status")
    assert status.stdout.count("running (supervisor pid") == 2, status.stdout + status.stderr
    again = pod("start")  # a second start must not launch a second trainer next to the first
    assert _wait_for(lambda: (homes / "w0" / "unitok_train.log").read_text().count("already supervised") == 1)
    assert len(_starts(out)) == 2

    stopped = pod("stop")
    assert stopped.stdout.count("SIGTERM sent") == 2, stopped.stdout + stopped.stderr
    assert _wait_for(lambda: (out / "terms.txt").exists() and len((out / "terms.txt").read_text().splitlines()) == 2)
    assert _wait_for(lambda: pod("status").stdout.count("not running") == 2)
    assert again.returncode == 0
