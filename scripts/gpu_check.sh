#!/usr/bin/env bash
# The GPU checks of issue 4 in one command (see scripts/gpu_check.py): parity and batch invariance on
# CUDA, dl19 and long throughput for sentence-transformers, transformers and the engine, MFU, the scorer
# stage. No downloads, no Ray, no flash-attn. Writes results/gpu-check-<device>.json (+ the table on stdout).
#   bash scripts/gpu_check.sh [--data-dir ../shared/data] [--small] [--device cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
# 570 s: the checks must end inside a 10-minute device slot, with the report written.
exec timeout 570 python scripts/gpu_check.py "$@"
