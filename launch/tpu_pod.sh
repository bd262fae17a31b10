#!/usr/bin/env bash
# Train on a Cloud TPU pod slice, from your workstation: set up the same code and the same package versions on
# every worker, then start the same supervised command on all of them (launch/tpu_worker.sh on each worker).
#
# Worked example (v5p-512 = 256 chips on 64 hosts: the paper's 16384 images = 64 per chip with the config's 8
# micro-batches; v4/v6e chips have 32 GiB: add --config.grad_accum_steps=16, see launch/README.md; data on a
# gcsfuse mount, run directory on GCS; INSTALL_PYTHON=1 because the TPU images ship Python 3.10):
#
#   TPU_NAME=unitok-v5p ZONE=us-east5-a PROJECT=my-project WORKDIR=gs://my-bucket/unitok_paper INSTALL_PYTHON=1 \
#   GCSFUSE_BUCKET=my-bucket GCSFUSE_MOUNT=/mnt/data \
#   launch/tpu_pod.sh --config=configs/unitok.py:paper \
#       --config.data.train_files='/mnt/data/datacomp_ar/*.array_record' \
#       --config.data.bpe_path=/mnt/data/weights/bpe_simple_vocab_16e6.txt.gz \
#       --config.loss.lpips_path=/mnt/data/weights/lpips_with_vgg.pth \
#       --config.discriminator.dino_path=/mnt/data/weights/dinov2_vits14_pretrain.pth
#
# Then:  ACTION=logs   launch/tpu_pod.sh   # follow worker 0's log (progress lines)
#        ACTION=status launch/tpu_pod.sh   # per worker: running or not, last log lines
#        ACTION=stop   launch/tpu_pod.sh   # SIGTERM on every worker: all checkpoint at the same step, exit 0
# Rerunning the start command resumes from the newest checkpoint in $WORKDIR (also after the slice was
# preempted and recreated: SETUP=1, the default, prepares the fresh VMs).
#
# Setup (ACTION=start with SETUP=1, or ACTION=setup), on every worker, in this order:
#  1. clone REPO_URL into REPO_DIR if needed and check out exactly COMMIT (detached; fails if it cannot);
#  2. create the venv with PYTHON_BIN (Python >= 3.11; INSTALL_PYTHON=1 installs python3.11 from the deadsnakes
#     PPA first: the TPU VM images ship Python 3.10);
#  3. worker 0 resolves `pip install -r requirements.txt`, then `jax[tpu]==<the jax that resolved>` (or
#     JAX_VERSION) with the libtpu find-links, and records the versions of everything it installed; every worker
#     then installs requirements.txt and jax[tpu]==<that version> constrained to exactly those versions, and
#     `pip install --no-deps -e .`; each worker checks its jax version.
# Start: on every worker, detached from the ssh session (setsid nohup), log in LOG:
#   launch/tpu_worker.sh = launch/supervise.sh $VENV/bin/python -m unitok_jax.main --distributed --workdir=$WORKDIR
#   with PRESET=tpu flags (launch/xla_flags.sh) and JAX_COMPILATION_CACHE_DIR=$WORKDIR/jax_cache.
#
# Environment:
#   TPU_NAME, ZONE              the TPU VM (required); PROJECT (optional: gcloud's default otherwise)
#   ACTION                      start (default) | setup | stop | status | logs
#   WORKDIR                     run directory, gs://... or a path all workers share (required for start)
#   REPO_URL                    (default: this checkout's `origin` remote); the workers need read access
#   COMMIT                      commit to run (default: this checkout's HEAD; must be pushed to REPO_URL)
#   REPO_DIR                    checkout on the workers (default unitok_jax, relative to the worker's home)
#   VENV                        venv on the workers (default $REPO_DIR/.venv)
#   PYTHON_BIN                  interpreter that creates the venv (default python3.11 if INSTALL_PYTHON=1, else
#                               python3)
#   JAX_VERSION                 pin instead of the version requirements.txt resolves to on worker 0
#   SETUP                       1 (default): run the setup before starting; 0: start only
#   LOG                         log file on each worker (default unitok_train.log in the worker's home)
#   PRESET, JAX_COMPILATION_CACHE_DIR, MAX_RESTARTS, RESTART_DELAY_S, RESTART_DELAY_MAX_S, RESTART_RESET_S,
#   MAX_QUICK_FAILURES, QUICK_FAILURE_S, NO_RESTART_CODES,
#   GCSFUSE_BUCKET, GCSFUSE_MOUNT   passed on to launch/tpu_worker.sh (see there)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACTION=${ACTION:-start}
LIBTPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html
REPO_DIR=${REPO_DIR:-unitok_jax}
VENV=${VENV:-$REPO_DIR/.venv}
LOG=${LOG:-unitok_train.log}
INSTALL_PYTHON=${INSTALL_PYTHON:-0}
if [[ "$INSTALL_PYTHON" == "1" ]]; then PYTHON_BIN=${PYTHON_BIN:-python3.11}; else PYTHON_BIN=${PYTHON_BIN:-python3}; fi
SETUP=${SETUP:-1}
q() { printf '%q' "$1"; }   # quote one word for the worker's shell
# Start of every remote command: from the worker's home, $repo and $venv as absolute paths.
PROLOGUE="set -euo pipefail; cd; repo=\$(realpath -m $(q "$REPO_DIR")); venv=\$(realpath -m $(q "$VENV"))"

ssh_workers() {   # ssh_workers WORKER COMMAND: run COMMAND with bash on worker WORKER ("all" or an index)
  local worker=$1 command=$2
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --worker="$worker" --command="bash -c $(q "$command")"
}

setup_workers() {
  REPO_URL=${REPO_URL:-$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)}
  : "${REPO_URL:?set REPO_URL (no origin remote in this checkout)}"
  COMMIT=${COMMIT:-$(git -C "$REPO_ROOT" rev-parse HEAD)}
  COMMIT=$(git -C "$REPO_ROOT" rev-parse --verify -q "$COMMIT^{commit}" 2>/dev/null || echo "$COMMIT")
  if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    echo "[tpu_pod] warning: this checkout has uncommitted changes; the workers run commit $COMMIT without them" >&2
  fi
  if [[ -z "$(git -C "$REPO_ROOT" branch -r --contains "$COMMIT" 2>/dev/null)" ]]; then
    echo "[tpu_pod] warning: no remote branch here contains $COMMIT: push it, or the workers cannot fetch it" >&2
  fi
  echo "[tpu_pod] setup on every worker of $TPU_NAME: $REPO_URL @ $COMMIT, venv $VENV ($PYTHON_BIN)"

  local python_install=""
  if [[ "$INSTALL_PYTHON" == "1" ]]; then
    python_install="command -v $(q "$PYTHON_BIN") >/dev/null || { sudo add-apt-repository -y ppa:deadsnakes/ppa \
      && sudo apt-get update -q && sudo apt-get install -y -q $(q "$PYTHON_BIN") $(q "$PYTHON_BIN")-venv; }"
  fi
  # 1 + 2: code at exactly COMMIT, and a venv, on every worker.
  ssh_workers all "$PROLOGUE
    $python_install
    if [ ! -d \"\$repo/.git\" ]; then git clone --quiet $(q "$REPO_URL") \"\$repo\"; fi
    cd \"\$repo\"
    if ! git cat-file -e $(q "$COMMIT^{commit}") 2>/dev/null; then git fetch --quiet origin; fi
    if ! git cat-file -e $(q "$COMMIT^{commit}") 2>/dev/null; then git fetch --quiet origin $(q "$COMMIT"); fi
    git checkout --quiet --detach $(q "$COMMIT")
    test \"\$(git rev-parse HEAD)\" = $(q "$COMMIT")
    $(q "$PYTHON_BIN") -c 'import sys; assert sys.version_info >= (3, 11), \"Python >= 3.11 needed (have %s): set PYTHON_BIN or INSTALL_PYTHON=1\" % sys.version.split()[0]'
    [ -x \"\$venv/bin/python\" ] || $(q "$PYTHON_BIN") -m venv \"\$venv\"
    \"\$venv/bin/pip\" install -q --upgrade pip"

  # 3a: worker 0 resolves requirements.txt, then the matching jax[tpu], and prints what it installed.
  local jax_pin=${JAX_VERSION:-}
  local resolved
  resolved=$(ssh_workers 0 "$PROLOGUE
    cd \"\$repo\"
    \"\$venv/bin/pip\" install -q -r requirements.txt
    pin=$(q "$jax_pin")
    v=\${pin:-\$(\"\$venv/bin/python\" -c 'import jax; print(jax.__version__)')}
    \"\$venv/bin/pip\" install -q \"jax[tpu]==\$v\" -f $LIBTPU_FIND_LINKS
    echo '--- unitok constraints ---'
    \"\$venv/bin/pip\" freeze --exclude-editable
    echo '--- unitok jax ---'
    echo \"\$v\"")
  local constraints jax_version
  constraints=$(sed -n '/^--- unitok constraints ---$/,/^--- unitok jax ---$/p' <<< "$resolved" | sed '1d;$d' \
                | grep -E '^[A-Za-z0-9_.-]+(\[[^]]*\])?==' || true)
  jax_version=$(sed -n '/^--- unitok jax ---$/{n;p;}' <<< "$resolved" | tr -d '[:space:]')
  if [[ ! "$jax_version" =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || [[ -z "$constraints" ]]; then
    echo "[tpu_pod] could not read the versions resolved on worker 0; its output:" >&2
    echo "$resolved" >&2
    exit 1
  fi
  echo "[tpu_pod] worker 0 resolved jax $jax_version; pinning $(wc -l <<< "$constraints") packages on every worker"

  # 3b: every worker installs the same versions.
  ssh_workers all "$PROLOGUE
    cd \"\$repo\"
    printf '%s\\n' $(q "$constraints") > /tmp/unitok_constraints.txt
    \"\$venv/bin/pip\" install -q -r requirements.txt -c /tmp/unitok_constraints.txt
    \"\$venv/bin/pip\" install -q $(q "jax[tpu]==$jax_version") -c /tmp/unitok_constraints.txt -f $LIBTPU_FIND_LINKS
    \"\$venv/bin/pip\" install -q --no-deps -e .
    \"\$venv/bin/python\" -c 'import importlib.metadata as m, jax, socket; assert jax.__version__ == \"$jax_version\", jax.__version__; print(socket.gethostname(), \"jax\", jax.__version__, \"jaxlib\", m.version(\"jaxlib\"), \"libtpu\", m.version(\"libtpu\"))'"
}

start_workers() {
  : "${WORKDIR:?set WORKDIR (gs://bucket/run or a path all workers share)}"
  local env_args="" name
  for name in WORKDIR PRESET JAX_COMPILATION_CACHE_DIR MAX_RESTARTS RESTART_DELAY_S RESTART_DELAY_MAX_S \
              RESTART_RESET_S MAX_QUICK_FAILURES QUICK_FAILURE_S NO_RESTART_CODES GCSFUSE_BUCKET GCSFUSE_MOUNT; do
    if [[ -n "${!name+x}" ]]; then env_args+=" $name=$(q "${!name}")"; fi
  done
  local args=""
  if (($# > 0)); then args=$(printf ' %q' "$@"); fi
  ssh_workers all "$PROLOGUE
    cd \"\$repo\"
    env$env_args VENV=\"\$venv\" setsid nohup bash launch/tpu_worker.sh$args >> \$HOME/$(q "$LOG") 2>&1 < /dev/null &
    sleep 0.5
    echo \"\$(hostname): started, log ~/$LOG:\"; tail -n 2 \$HOME/$(q "$LOG")"
  echo "[tpu_pod] started on every worker of $TPU_NAME. Follow: ACTION=logs $0   Stop: ACTION=stop $0"
}

case "$ACTION" in
  setup) setup_workers ;;
  start)
    if [[ "$SETUP" == "1" ]]; then setup_workers; fi
    start_workers "$@"
    ;;
  stop)
    ssh_workers all "p=\$HOME/unitok_supervise.pid; if [ -f \$p ] && kill -TERM \$(cat \$p) 2>/dev/null; then
      echo \"\$(hostname): SIGTERM sent (checkpoint, then exit)\"; else echo \"\$(hostname): not running\"; fi"
    ;;
  status)
    ssh_workers all "p=\$HOME/unitok_supervise.pid; if [ -f \$p ] && kill -0 \$(cat \$p) 2>/dev/null; then
      echo \"\$(hostname): running (supervisor pid \$(cat \$p))\"; else echo \"\$(hostname): not running\"; fi;
      tail -n 3 \$HOME/$(q "$LOG") 2>/dev/null || true"
    ;;
  logs) ssh_workers 0 "tail -n 100 -F \$HOME/$(q "$LOG")" ;;
  *)
    echo "ACTION must be start, setup, stop, status or logs (not '$ACTION')" >&2
    exit 64
    ;;
esac
