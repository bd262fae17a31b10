#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: N processes, each with D fake CPU devices, gloo collectives,
# jax.distributed through a localhost coordinator. Same code path as a pod: sharded state, cross-host collectives,
# per-process input shards, multi-host Orbax checkpoints, process-0-only logging, and the same failure handling:
# the group runs under launch/supervise.sh, and when any process exits non-zero the others are stopped (like
# SLURM's --kill-on-bad-exit; a survivor would wait in a collective for a peer that is gone) and the whole group
# is restarted, resuming from the newest checkpoint, with a new coordinator port.
#
# Worked example (2 processes x 4 devices = an 8-device FSDP mesh, the tiny config, 20 steps), from the repo root:
#
#   NPROC=2 DEVICES=4 launch/local_cpu_rehearsal.sh --config=configs/unitok.py:tiny --workdir=/tmp/rehearsal \
#       --config.total_steps=20 --config.mesh.data=2 --config.mesh.fsdp=-1 --config.mesh.rules=fsdp
#
# Rerun the same command to resume from /tmp/rehearsal (it exits at once when the run is complete). Try a failure:
# `kill -9` one of the two python processes; the other is stopped, and after RESTART_DELAY_S both start again and
# resume. SIGTERM (or Ctrl-C) to this script: both processes checkpoint at the same step and exit 0, no restart.
# Logs: $LOGDIR/p<i>.log, appended per attempt (process 0 also on the console).
# tests/test_multiprocess.py runs this script (with a kill, a preemption and a rerun) and checks it ends with the
# same losses and params as one 8-device process.
#
# Environment:
#   NPROC (2), DEVICES (4)             processes, fake CPU devices per process
#   PYTHON                             interpreter (default: the repo's .venv/bin/python)
#   LOGDIR                             per-process logs (default ./rehearsal_logs)
#   JAX_COMPILATION_CACHE_DIR          persistent compilation cache (default: none, see below)
#   MAX_RESTARTS, RESTART_DELAY_S, ... restart policy, see launch/supervise.sh (RESTART_DELAY_S defaults to 5 here)
#   GROUP_KILL_GRACE_S                 SIGTERM -> SIGKILL delay for the survivors, see launch/process_group.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PY=${PYTHON:-$(default_python)}
NPROC=${NPROC:-2}
DEVICES=${DEVICES:-4}
export GROUP_LOGDIR=${LOGDIR:-./rehearsal_logs}
export GROUP_SIZE=$NPROC
export GROUP_PYTHON=${GROUP_PYTHON:-$PY}
export RESTART_DELAY_S=${RESTART_DELAY_S:-5}
export SUPERVISE_LABEL=${SUPERVISE_LABEL:-rehearsal}

PRESET=cpu source "$LAUNCH_DIR/xla_flags.sh"
export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo   # also when the caller's env says otherwise
# One fake-device count per process: drop a count inherited from the caller's XLA_FLAGS, then set ours.
flags=()
read -r -a inherited <<< "${XLA_FLAGS:-}"
for f in ${inherited[@]+"${inherited[@]}"}; do
  if [[ "$f" != --xla_force_host_platform_device_count=* ]]; then flags+=("$f"); fi
done
export XLA_FLAGS="${flags[*]+${flags[*]} }--xla_force_host_platform_device_count=$DEVICES"
export PYTHONUNBUFFERED=1
# No persistent compilation cache by default here: on multi-process CPU, jax 0.10 keys cache entries per process
# and only process 0 writes them, so on a resume process 0 loads its steps in seconds while the others compile
# for minutes, and process 0's first collective then fails on gloo's fixed 30 s rendezvous deadline
# ("Gloo context initialization failed: DEADLINE_EXCEEDED"). Export JAX_COMPILATION_CACHE_DIR to use one anyway.
if [[ -n "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then export JAX_COMPILATION_CACHE_DIR; fi
lock_workdir "$(arg_value workdir "$@")"

exec "$LAUNCH_DIR/supervise.sh" "$LAUNCH_DIR/process_group.sh" \
  "$PY" -m unitok_jax.main "$@" \
  --coordinator_address="localhost:{port}" --num_processes="$NPROC" --process_id="{rank}"
