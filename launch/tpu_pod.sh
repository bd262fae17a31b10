#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: set up the same venv on every worker, then run the same command on all of them.
#
# Worked example (v5p-64 = 8 hosts x 4 chips, paper config, data and weights on GCS / a shared disk):
#
#   TPU_NAME=unitok-v5p64 ZONE=us-east5-a PROJECT=my-project \
#   WORKDIR=gs://my-bucket/unitok_paper \
#   REPO_URL=https://github.com/me/unitok_jax.git \
#   launch/tpu_pod.sh --config=configs/unitok.py:paper \
#       --config.data.train_files='gs://my-bucket/datacomp_ar/*.array_record' \
#       --config.data.bpe_path=/mnt/weights/bpe_simple_vocab_16e6.txt.gz \
#       --config.loss.lpips_path=/mnt/weights/lpips_with_vgg.pth \
#       --config.discriminator.dino_path=/mnt/weights/dinov2_vits14_pretrain.pth
#
# jax.distributed.initialize() needs no flags on TPU: the coordinator, process count and process id come from the
# TPU metadata (unitok_jax.main turns it on when TPU_WORKER_HOSTNAMES lists more than one host). Every worker runs
# the identical command; process 0 writes metrics/images, all write their checkpoint shards (Orbax).
# Re-running the script resumes from the newest checkpoint in $WORKDIR. SETUP=0 skips the venv step.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://... or a shared path)}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_URL=${REPO_URL:-https://github.com/your-org/unitok_jax.git}
REPO_DIR=${REPO_DIR:-\$HOME/unitok_jax}
VENV=${VENV:-\$HOME/venv_unitok}
SETUP=${SETUP:-1}

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

if [[ "$SETUP" == "1" ]]; then
  ssh_all "set -e
    [ -d $REPO_DIR ] || git clone $REPO_URL $REPO_DIR
    cd $REPO_DIR && git pull --ff-only || true
    python3 -m venv $VENV
    $VENV/bin/pip install -q --upgrade pip
    $VENV/bin/pip install -q 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
    $VENV/bin/pip install -q -e $REPO_DIR"
fi

ARGS=$(printf ' %q' "$@")
# nohup + log per worker: the run survives a dropped ssh connection; tail it with the same ssh command.
ssh_all "cd $REPO_DIR && nohup $VENV/bin/python -m unitok_jax.main --workdir=$WORKDIR $ARGS \
  > \$HOME/unitok_train.log 2>&1 &"
echo "started on all workers of $TPU_NAME; logs: ~/unitok_train.log on each worker (process 0 has the progress lines)"
