#!/usr/bin/env bash
# Runs ON EACH TPU VM worker (launch/tpu_pod.sh starts it there through `gcloud ... ssh --worker=all`): the
# supervised training process of this host. Not meant to be called by hand, but it can be, from the repo root of
# a worker:  WORKDIR=gs://bucket/run launch/tpu_worker.sh --config=configs/unitok.py:paper ...
#
# What it does: refuses to start a second copy (pid file), optionally mounts the data bucket with gcsfuse,
# sources the TPU flag preset, points the persistent compilation cache at $WORKDIR/jax_cache, and execs
#   launch/supervise.sh $VENV/bin/python -m unitok_jax.main --distributed --workdir=$WORKDIR "$@"
# so a crash (or a peer host that died and took the collectives down) restarts this host's process, which
# rejoins the others through jax.distributed and resumes from the newest checkpoint.
#
# Environment:
#   WORKDIR                     run directory (gs://... or a path every worker shares) (required)
#   VENV                        virtualenv (default: <repo>/.venv)
#   PRESET                      flag preset, see launch/xla_flags.sh (default tpu)
#   JAX_COMPILATION_CACHE_DIR   (default $WORKDIR/jax_cache; "" = off)
#   PIDFILE                     (default $HOME/unitok_supervise.pid); ACTION=stop in tpu_pod.sh signals this pid
#   GCSFUSE_BUCKET, GCSFUSE_MOUNT   when set: mount the bucket at the mount point (default /mnt/data) unless
#                               already mounted (gcsfuse --implicit-dirs); needs gcsfuse installed on the worker
#   MAX_RESTARTS, RESTART_DELAY_S, NO_RESTART_CODES, ...   restart policy, see launch/supervise.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${WORKDIR:?set WORKDIR (gs://bucket/run or a shared path)}"
VENV=${VENV:-$REPO_ROOT/.venv}
PIDFILE=${PIDFILE:-$HOME/unitok_supervise.pid}

if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "[tpu_worker] $(hostname): a run is already supervised here (pid $(cat "$PIDFILE")); stop it first" >&2
  exit 1
fi
echo $$ > "$PIDFILE"

if [[ -n "${GCSFUSE_BUCKET:-}" ]]; then
  mount_point=${GCSFUSE_MOUNT:-/mnt/data}
  if ! mountpoint -q "$mount_point"; then
    sudo mkdir -p "$mount_point"
    sudo chown "$(id -u):$(id -g)" "$mount_point"
    gcsfuse --implicit-dirs "$GCSFUSE_BUCKET" "$mount_point"
  fi
fi

PRESET=${PRESET:-tpu} source "$LAUNCH_DIR/xla_flags.sh"
setup_compilation_cache "$WORKDIR"
export PYTHONUNBUFFERED=1
export SUPERVISE_LABEL="supervise $(hostname)"
echo "[tpu_worker] $(hostname): commit $(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || echo '?')," \
     "jax $("$VENV/bin/python" -c 'import jax; print(jax.__version__)' 2>/dev/null || echo '?')," \
     "compilation cache ${JAX_COMPILATION_CACHE_DIR:-off}, LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-}"
exec "$LAUNCH_DIR/supervise.sh" "$VENV/bin/python" -m unitok_jax.main --distributed --workdir="$WORKDIR" "$@"
