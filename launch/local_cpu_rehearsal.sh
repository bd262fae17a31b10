#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: N processes, each with D fake CPU devices, gloo collectives,
# jax.distributed through a localhost coordinator. Same code path as a pod: sharded state, cross-host collectives,
# per-process input shards, multi-host Orbax checkpoints, process-0-only logging.
#
# Worked example (2 processes x 4 devices = an 8-device FSDP mesh, the tiny config, 20 steps):
#
#   NPROC=2 DEVICES=4 launch/local_cpu_rehearsal.sh --config=configs/unitok.py:tiny --workdir=/tmp/rehearsal \
#       --config.total_steps=20 --config.mesh.data=2 --config.mesh.fsdp=-1 --config.mesh.rules=fsdp
#
# Rerun the same command to resume from /tmp/rehearsal. Logs: $LOGDIR/p<i>.log (process 0 also to the console).
# tests/test_multiprocess.py runs this layout and checks it ends with the same params as one 8-device process.
set -euo pipefail

PY=${PYTHON:-python}
NPROC=${NPROC:-2}
DEVICES=${DEVICES:-4}
PORT=${PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
LOGDIR=${LOGDIR:-./rehearsal_logs}
mkdir -p "$LOGDIR"

export JAX_PLATFORMS=cpu
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"

pids=()
for ((i = 1; i < NPROC; i++)); do
  $PY -m unitok_jax.main "$@" --coordinator_address="localhost:$PORT" --num_processes="$NPROC" --process_id="$i" \
      > "$LOGDIR/p$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
$PY -m unitok_jax.main "$@" --coordinator_address="localhost:$PORT" --num_processes="$NPROC" --process_id=0 \
    2>&1 | tee "$LOGDIR/p0.log" || status=$?
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
