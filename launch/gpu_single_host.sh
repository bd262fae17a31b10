#!/usr/bin/env bash
# Train on the GPUs of one host (or one host of several, with MODE=per_gpu and a coordinator), supervised: a crash
# or a killed process restarts the run (launch/supervise.sh), which resumes from the newest checkpoint.
#
# Worked examples (from the repository root, after the README's install step):
#
#   # 1) one process driving all local GPUs (simplest; the usual choice on one host):
#   launch/gpu_single_host.sh --config=configs/unitok.py:b16_single_gpu --workdir=/runs/b16 \
#       --config.data.train_files='/data/cc3m_ar/*.array_record'
#
#   # 2) one process per GPU (8 processes; same result, closer to a multi-host layout):
#   MODE=per_gpu launch/gpu_single_host.sh --config=configs/unitok.py:base --workdir=/runs/base \
#       --config.data.train_files='/data/cc3m_ar/*.array_record'
#
# In per_gpu mode process i gets --local_device_ids=i, --process_id=HOST_INDEX*GPUS+i and the coordinator
# (localhost on a new port per attempt, or COORDINATOR); when one process exits non-zero the others are stopped
# and the group restarts (launch/process_group.sh). Several hosts by hand: run MODE=per_gpu on each with
# COORDINATOR=<host0>:<port>, NUM_HOSTS and HOST_INDEX set (a restart on one host then needs the others to restart
# too: they will, once their collectives time out); on a cluster prefer launch/slurm_multinode.sbatch.
#
# Stop: SIGTERM (or Ctrl-C) to this script -> the trainer checkpoints and exits 0; no restart.
#
# Environment:
#   PYTHON                      interpreter (default: the repo's .venv/bin/python)
#   MODE                        single (default) | per_gpu
#   GPUS                        GPUs on this host (default: nvidia-smi -L)
#   NUM_HOSTS, HOST_INDEX       per_gpu across hosts (default 1, 0)
#   COORDINATOR                 host:port of process 0 in per_gpu mode (default localhost:<free port per attempt>)
#   LOGDIR                      per_gpu logs, p<rank>.log (default ./gpu_logs)
#   PRESET                      flag preset, see launch/xla_flags.sh (default gpu)
#   JAX_COMPILATION_CACHE_DIR   persistent compilation cache (default <workdir>/jax_cache; "" = off)
#   MAX_RESTARTS, RESTART_DELAY_S, NO_RESTART_CODES, ...   restart policy, see launch/supervise.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PY=${PYTHON:-$(default_python)}
MODE=${MODE:-single}
PRESET=${PRESET:-gpu} source "$LAUNCH_DIR/xla_flags.sh"
setup_compilation_cache "$(arg_value workdir "$@")"
lock_workdir "$(arg_value workdir "$@")"
export PYTHONUNBUFFERED=1

if [[ "$MODE" == "single" ]]; then
  exec "$LAUNCH_DIR/supervise.sh" "$PY" -m unitok_jax.main "$@"
fi
if [[ "$MODE" != "per_gpu" ]]; then
  echo "MODE must be single or per_gpu, not '$MODE'" >&2
  exit 64
fi

GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
if ((GPUS < 1)); then
  echo "no GPU found (nvidia-smi -L); set GPUS" >&2
  exit 1
fi
NUM_HOSTS=${NUM_HOSTS:-1}
HOST_INDEX=${HOST_INDEX:-0}
export GROUP_SIZE=$GPUS
export GROUP_RANK_OFFSET=$((HOST_INDEX * GPUS))
export GROUP_LOGDIR=${LOGDIR:-./gpu_logs}
export GROUP_PYTHON=${GROUP_PYTHON:-$PY}
local_coordinator='localhost:{port}'   # process_group.sh puts a free port there, a new one per attempt
exec "$LAUNCH_DIR/supervise.sh" "$LAUNCH_DIR/process_group.sh" \
  "$PY" -m unitok_jax.main "$@" \
  --coordinator_address="${COORDINATOR:-$local_coordinator}" --num_processes="$((NUM_HOSTS * GPUS))" \
  --process_id="{rank}" --local_device_ids="{local_rank}"
