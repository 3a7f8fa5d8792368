#!/bin/bash
# The GPU check (benchmarks/gpu_check.py): Moshi 7B with random weights on one CUDA GPU, about
# ten minutes; prints one table and writes it to OUT.md (default gpu_check_<date>.md).
#   benchmarks/gpu_check.sh [OUT.md]          # 7B, CUDA
#   benchmarks/gpu_check.sh --cpu [OUT.md]    # the CPU-sized variant (tiny model; the tests run it)
# Record the table in docs/benchmarks.md with the card, the date and this command.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SIZE=7b
if [ "${1:-}" = "--cpu" ]; then SIZE=tiny; shift; fi
OUT=${1:-gpu_check_$(date +%Y%m%d_%H%M%S).md}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec timeout "${GPU_CHECK_TIMEOUT:-1200}" "$PYTHON" benchmarks/gpu_check.py --size "$SIZE" --out "$OUT"
