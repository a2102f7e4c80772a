#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: copy this checkout to every worker, install, launch on all workers.
#
#   scripts/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [more train.py flags]
#   scripts/tpu_vm.sh sora-b us-east5-a experiments/sora_b.py /mnt/gcs/runs/sora_b \
#       --config.data.latents_dir=/mnt/gcs/latents --config.data.tokenizer=/mnt/gcs/tokenizer.model
#
# Create the slice first (v5p-128 = 64 chips = topology 4x4x4, the slice experiments/sora_b.py is made for):
#   gcloud compute tpus tpu-vm create sora-b --zone us-east5-a --accelerator-type v5p-128 \
#       --version v2-alpha-tpuv5
# WORKDIR and the data must be visible to every worker at the same path (a gcsfuse mount of a bucket,
# or Filestore): every process writes its part of each checkpoint there (orbax, multi-host).
# Check the fit first, from any machine: python -m sora_jax.compile_check --config CONFIG.
# Each worker runs one process; jax.distributed finds the others from the TPU metadata
# (sora_jax/distributed.py), and only process 0 logs.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,15p' "$0"; exit 2
fi
TPU=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }

git archive --format=tar.gz -o /tmp/sora-jax.tar.gz HEAD
gcloud compute tpus tpu-vm scp /tmp/sora-jax.tar.gz "$TPU":/tmp/ --zone "$ZONE" --worker=all
ssh_all "mkdir -p ~/sora-jax && tar xzf /tmp/sora-jax.tar.gz -C ~/sora-jax && cd ~/sora-jax &&
         (test -x .venv/bin/python || python3 -m venv .venv) && .venv/bin/pip install -q -e '.[tpu]'"
ssh_all "cd ~/sora-jax && nohup .venv/bin/python -m sora_jax.train --config $CONFIG --workdir $WORKDIR $* \
         > /tmp/train.log 2>&1 &"
echo "launched; follow process 0: gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=0 --command 'tail -f /tmp/train.log'"
