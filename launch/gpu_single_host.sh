#!/usr/bin/env bash
# Train on the GPUs of one host (or one host of several, with MODE=per_gpu and a coordinator).
#
# Worked examples:
#
#   # 1) one process driving all local GPUs (simplest; the usual choice on one host):
#   launch/gpu_single_host.sh --config=configs/unitok.py:b16_single_gpu --workdir=/runs/b16 \
#       --config.data.train_files='/data/cc3m_ar/*.array_record'
#
#   # 2) one process per GPU (8 processes; same result, closer to a multi-host layout):
#   MODE=per_gpu launch/gpu_single_host.sh --config=configs/unitok.py:base --workdir=/runs/base \
#       --config.data.train_files='/data/cc3m_ar/*.array_record'
#
# In per_gpu mode process i gets --local_device_ids=i, --process_id=i and the coordinator localhost:$PORT.
# Several hosts by hand: run MODE=per_gpu on each with COORDINATOR=<host0>:<port>, NUM_HOSTS and HOST_INDEX set
# (process ids are HOST_INDEX*GPUS + i); on a cluster prefer launch/slurm_multinode.sbatch.
set -euo pipefail

PY=${PYTHON:-python}
MODE=${MODE:-single}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

if [[ "$MODE" == "single" ]]; then
  exec $PY -m unitok_jax.main "$@"
fi

NUM_HOSTS=${NUM_HOSTS:-1}
HOST_INDEX=${HOST_INDEX:-0}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
COORDINATOR=${COORDINATOR:-localhost:$PORT}
NUM_PROCESSES=$((NUM_HOSTS * GPUS))
pids=()
for ((i = 0; i < GPUS; i++)); do
  pid=$((HOST_INDEX * GPUS + i))
  $PY -m unitok_jax.main "$@" --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" \
      --process_id="$pid" --local_device_ids="$i" > "train_p${pid}.log" 2>&1 &
  pids+=($!)
done
echo "started ${#pids[@]} processes (logs train_p*.log); process 0 prints progress"
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
