#!/bin/bash
# Multi-node training with SLURM + torchrun: one torchrun per node, 8 GPUs each.
#   sbatch scripts/slurm_train.sh configs/moshi7b_dailytalk.yaml --set max_steps=4000
#SBATCH --job-name=moshi-ttt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG.yaml [--set key=value ...]}
shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# --resume continues from the newest checkpoint of the run_dir when the job is requeued.
RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then RESUME=(--resume); fi

srun .venv/bin/torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc-per-node 8 \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:29500" \
    -m moshi_ttt.cli train "$CONFIG" "${RESUME[@]}" "$@"
