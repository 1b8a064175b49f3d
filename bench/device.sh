#!/usr/bin/env bash
# Every GPU benchmark in one call on one GPU machine (< 8 minutes), written to one JSON file:
# ADM-64 / ADM-256 bf16 training steps with MFU, peak memory vs the dry-run plan and host syncs;
# guided ADM-256 sampling (DDPM step, DPM-Solver++ 20 steps) with MFU and host syncs; the
# evaluator's Inception and precision/recall throughput. See bench/device.py.
#
#   bash bench/device.sh [OUT.json]        # default bench-device-<host>-<date>.json
#   bash bench/device.sh --cpu [OUT.json]  # smoke run of the same code on the CPU, tiny sizes
#
# Uses $PYTHON (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
MODE=()
if [[ "${1:-}" == "--cpu" ]]; then
    MODE=(--cpu)
    shift
fi
OUT="${1:-bench-device-$(hostname -s)-$(date +%Y%m%d-%H%M%S).json}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ ${#MODE[@]} -eq 0 ]]; then
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "bench/device.sh: error: no CUDA device visible to $PY (run it on a GPU machine, or --cpu for a smoke run)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
fi
# 8 minutes in all: the script skips sections that would start after 450 s; the timeout is the backstop.
timeout --signal=TERM --kill-after=20 480 "$PY" bench/device.py "${MODE[@]}" --out "$OUT"
echo "bench/device.sh: results in $OUT"
