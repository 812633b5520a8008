#!/usr/bin/env bash
# GPU check (README "GPU check"): a few optimizer steps of every stage with the full Cortex 2.5 config in bf16 on one
# device and under DeepSpeed ZeRO-2/3 with one rank, then the chat server's decode speed; at most 8 minutes.
#   bash bench/gpu_check.sh [--profile] [--parts mix/zero3 ...] [--smoke] > gpu_check.jsonl
# One JSON line per part on stdout, logs on stderr; exit status 1 when any part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
exec python3 bench/gpu_check.py "$@"
