#!/usr/bin/env bash
# GPU readiness + benchmark in one command (see bench/gpu_bench.py): device-agnostic tests on the device,
# APHQ / ERQ / the other methods on DeiT-S W4A4 at reduced counts with per-stage time, peak GPU memory
# and full-size extrapolation.   bench/gpu.sh [--device cpu] [--smoke] [--methods aphq erq] [--json F]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_bench.py "$@"
