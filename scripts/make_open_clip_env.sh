#!/usr/bin/env bash
# Creates the virtual environment benchmarks/vs_open_clip.py runs open_clip in: torch,
# torchvision and open_clip_torch at the versions the benchmark was written against, kept
# apart from psd_jax's own environment (torch from PyPI brings several GiB of CUDA libraries).
#
#     scripts/make_open_clip_env.sh [VENV_DIR]    (default: ~/.cache/psd_jax/open_clip_venv)
set -euo pipefail
venv="${1:-${HOME}/.cache/psd_jax/open_clip_venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q 'torch==2.14.1' 'torchvision==0.29.1' 'open_clip_torch==3.3.0'
"$venv/bin/python" -c 'import torch, open_clip; print("open_clip", open_clip.__version__, "torch", torch.__version__, "in", __import__("sys").prefix)'
