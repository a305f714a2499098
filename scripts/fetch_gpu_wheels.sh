#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a GPU machine that cannot download: the wheels
# of psd_jax's dependencies that such a machine lacks (it has JAX with CUDA, flax, optax, orbax
# and PyTorch) in .gpu_wheels/ (with open_clip, for the side-by-side step), and the demo's prepared data, the CLIP vocabulary and the
# zero-shot metadata in .gpu_cache/ (both ignored by git; carried to the machine with the
# working tree). Fails when they exceed the 60 MiB a device call may carry with the code.
#
#   scripts/fetch_gpu_wheels.sh [PYTHON_VERSION]   # the GPU machine's, e.g. 3.12 (default: ours)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
rm -rf .gpu_wheels .gpu_cache && mkdir -p .gpu_wheels .gpu_cache/tfds
# what psd_jax imports beyond the machine's JAX stack, and what those import
python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d .gpu_wheels tensorflow-datasets grain array-record ml-collections ftfy wcwidth regex \
  safetensors resvg-py sentencepiece tensorboardX portpicker psutil wrapt simple-parsing docstring-parser \
  immutabledict tensorflow-metadata toml termcolor dm-tree cloudpickle open-clip-torch
cache=${PSD_JAX_CACHE:-$HOME/.cache/psd_jax}
[ -f "$cache/emoji_sources/.complete" ] || python -m psd_jax.data.fetch
cp "$cache/bpe_simple_vocab_16e6.txt.gz" "$cache/zero_shot_metadata.json" .gpu_cache/
for d in emoji/label emoji_styles; do  # prepared: the GPU machine need not prepare them
  mkdir -p ".gpu_cache/tfds/$(dirname $d)" && cp -r "$cache/tfds/$d" ".gpu_cache/tfds/$d"
done
git rev-parse --short HEAD > .gpu_cache/commit
size=$(du -sm .gpu_wheels .gpu_cache | awk '{s += $1} END {print s}')
echo "wheels and data: ${size} MiB in .gpu_wheels/ and .gpu_cache/"
[ "$size" -le 60 ] || { echo "over the 60 MiB a device call carries" >&2; exit 1; }
