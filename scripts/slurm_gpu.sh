#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per GPU, jax.distributed from srun's variables.
#
#   sbatch --nodes=16 scripts/slurm_gpu.sh experiments/sora_b.py /shared/runs/sora_b [more flags]
#
# The repo and its .venv (pip install -e '.[gpu]') live on a shared file system, as do WORKDIR and
# the data. The DiT runs its GPU Pallas attention kernel (--config.dit.attention=gpu).
#SBATCH --job-name=sora-jax
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,7p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "${SLURM_SUBMIT_DIR:-.}"
# SLURM_JOB_ID and SLURM_NTASKS > 1 make sora_jax.distributed call jax.distributed.initialize(),
# which reads the coordinator (first node), process count and id from srun's environment; each
# process then sees the one GPU SLURM bound it to.
srun --kill-on-bad-exit=1 .venv/bin/python -m sora_jax.train --config "$CONFIG" --workdir "$WORKDIR" \
  --config.dit.attention=gpu "$@"
