#!/bin/bash
# Multi-node training with SLURM + torchrun: one torchrun per node, GPUS_PER_NODE GPUs each.
#   GLOBAL_BATCH=16 sbatch scripts/slurm_train.sh configs/moshi7b_dailytalk.yaml --set batch_size=1
#
# The global batch (windows per optimizer step) is batch_size x grad_accum x GPUs, so more nodes
# mean a larger batch with the same learning rates. The shipped 7B configs are tuned for one
# node of 8 GPUs (moshi7b_dailytalk: 16 windows, moshi7b_long_audio: 16). On more than one node
# choose explicitly:
#   GLOBAL_BATCH=N    keep N windows per step (--set global_batch=N: grad_accum is derived, and
#                     N must be a multiple of batch_size x GPUs, e.g. batch_size=1 on 16 GPUs);
#   GLOBAL_BATCH=scale  accept batch_size x grad_accum x GPUs (then scale the learning rates).
# A requeued job (SLURM_RESTART_COUNT > 0) passes --requeue: it resumes from the newest
# checkpoint of run_dir if there is one, else starts afresh.
#SBATCH --job-name=moshi-ttt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG.yaml [--set key=value ...]}
shift
NNODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}

# The first host of the allocation, without a pipe: `scontrol ... | head -n 1` can kill
# scontrol with SIGPIPE, and pipefail then ends the job with status 141 before srun.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${HOSTS%%$'\n'*}
if [ -z "$HEAD_NODE" ]; then
    echo "slurm_train.sh: no host in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}" >&2
    exit 2
fi

BATCH=()
case "${GLOBAL_BATCH:-}" in
    "")
        if [ "$NNODES" -gt 1 ]; then
            echo "slurm_train.sh: $NNODES nodes x $GPUS_PER_NODE GPUs multiply the global batch" \
                 "of a config written for one node, with the same learning rates. Set" \
                 "GLOBAL_BATCH=N to keep N windows per step (e.g. GLOBAL_BATCH=16 with" \
                 "--set batch_size=1 for moshi7b_dailytalk), or GLOBAL_BATCH=scale to accept" \
                 "the larger batch." >&2
            exit 2
        fi
        ;;
    scale) ;;
    *[!0-9]*)
        echo "slurm_train.sh: GLOBAL_BATCH must be a number of windows or 'scale'," \
             "got '$GLOBAL_BATCH'" >&2
        exit 2
        ;;
    *) BATCH=(--set "global_batch=$GLOBAL_BATCH") ;;
esac

# A requeued job continues from the newest checkpoint, or starts afresh if none was written.
RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then RESUME=(--requeue); fi

echo "slurm_train.sh: $NNODES node(s) x $GPUS_PER_NODE GPUs, head $HEAD_NODE," \
     "restart ${SLURM_RESTART_COUNT:-0}, global batch ${GLOBAL_BATCH:-config}"
srun "$TORCHRUN" \
    --nnodes "$NNODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:29500" \
    -m moshi_ttt.cli train "$CONFIG" ${RESUME[@]+"${RESUME[@]}"} ${BATCH[@]+"${BATCH[@]}"} "$@"
