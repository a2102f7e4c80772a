#!/usr/bin/env bash
# Train on GKE TPU slices with XPK (github.com/AI-Hypercomputer/xpk), one or several slices.
#
#   scripts/xpk.sh CLUSTER NAME TPU_TYPE NUM_SLICES CONFIG WORKDIR [more train.py flags]
#   # sora_xl on one v5p-512 slice (topology 8x8x4):
#   scripts/xpk.sh my-cluster sora-xl v5p-512 1 experiments/sora_xl.py /gcs/runs/sora_xl
#   # two v5p-512 slices over DCN: the config's `data` axis (2) spans the slices, FSDP stays inside:
#   scripts/xpk.sh my-cluster sora-xl2 v5p-512 2 experiments/sora_xl.py:topology=2xv5p:8x8x4 /gcs/runs/sora_xl2
#
# Check the fit first: python -m sora_jax.compile_check --config CONFIG --topology v5p:8x8x4
# [--num_slices 2]. The image is built from this checkout (xpk's --base-docker-image builds one with
# the working directory copied in). XPK sets the TPU and MEGASCALE_* variables on every pod; jax finds
# its peers from them (sora_jax/distributed.py), and sharding.make_mesh lays the `data` axis over
# slices when the devices span several.
set -euo pipefail
if [[ $# -lt 6 ]]; then
  sed -n '2,16p' "$0"; exit 2
fi
CLUSTER=$1; NAME=$2; TPU_TYPE=$3; SLICES=$4; CONFIG=$5; WORKDIR=$6; shift 6
xpk workload create \
  --cluster "$CLUSTER" \
  --workload "$NAME" \
  --tpu-type "$TPU_TYPE" \
  --num-slices "$SLICES" \
  --base-docker-image python:3.11-slim \
  --script-dir . \
  --command "pip install -q -e '.[tpu]' && python -m sora_jax.train --config $CONFIG --workdir $WORKDIR $*"
