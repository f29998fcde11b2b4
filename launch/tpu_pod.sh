#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker runs the same command; jax.distributed discovers
# the slice by itself (multi-host TPU environment), and each host reads only its share of the data.
#
#   TPU=my-v4-32 ZONE=us-central2-b CONFIG=configs/mvtec.py:res=224 WORKDIR=gs://bucket/runs/mvtec \
#   DATA=/mnt/data bash launch/tpu_pod.sh [--config.key=value ...]
#
# Assumes the repo is cloned at ~/onenip-jax on every worker and the datasets (and the converted
# backbone weights) are at the same path on every worker (e.g. a mounted disk or gcsfuse).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
REPO=${REPO:-~/onenip-jax}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  cd $REPO
  pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  onenip-train --config=$CONFIG --workdir=$WORKDIR --config.distributed=True $*
"
