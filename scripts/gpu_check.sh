#!/usr/bin/env bash
# The GPU check in one command (see scripts/gpu_check.py --help): parity and batch invariance on CUDA, the
# engine on token ids (bf16, fp8) with MFU, sentence-transformers/transformers/engine end to end, fp8
# fidelity, the scorer stage. No downloads, no Ray, no flash-attn. Writes gpu-check.json into --out
# (default $OUT) after every step, and gpu-check.md at the end.
#   python3 scripts/gpu_check.py --prepare .gpu-data     # first, where the shared data is
#   bash scripts/gpu_check.sh [--data-dir .gpu-data] [--out DIR] [--budget-s 480] [--small --device cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
# GPU images often have python3 only; a venv or conda may have python only.
PYTHON=$(command -v python3 || command -v python)
# 570 s: the checks (budget 480 s) must end inside a 10-minute device slot. On SIGTERM the script writes
# what it has; -k 20 kills it if that write hangs.
exec timeout -k 20 570 "$PYTHON" scripts/gpu_check.py "$@"
