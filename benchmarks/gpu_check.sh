#!/usr/bin/env bash
# The accelerator check in one command, on a GPU machine with JAX (CUDA), flax, optax, orbax
# and PyTorch preinstalled and no network: installs the carried wheels (scripts/
# fetch_gpu_wheels.sh made them), runs benchmarks/gpu_check.py within BUDGET_S seconds
# (default 540) and writes gpu_check.json into OUT (default: here). Run through the device tool:
#   run(command="benchmarks/gpu_check.sh", carry=[".gpu_wheels", ".gpu_cache"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-index --no-deps .gpu_wheels/*.whl
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PSD_JAX_CACHE=$PWD/.gpu_cache
export PSD_JAX_COMMIT=$(cat .gpu_cache/commit 2>/dev/null || echo unknown)
python benchmarks/gpu_check.py --budget_s "${BUDGET_S:-540}" --out "${OUT:-.}/gpu_check.json"
