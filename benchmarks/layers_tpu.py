"""What the model's own layers save on a TPU against flax's: a config's train step compiled
ahead of time for its slice (psd_jax.compile_check; needs libtpu: pip install -e '.[aot]') as
it is, then with one layer swapped for flax's, at the config's own global batch:

- LayerNorm: psd_jax/models/norm.py (closed-form backward) -> flax.linen.LayerNorm (automatic
  differentiation; same parameters, same float32 statistics);
- dense: psd_jax/models/dense.py (a flattened 2-D matmul) -> flax.linen.DenseGeneral over the
  same input axes (same parameters and values).

    python benchmarks/layers_tpu.py [--config psd_cc3m_vitb32] [--global_batch N]
        [--out benchmarks/results/layers_tpu.json]

Prints one line per compile and writes the JSON: per-device memory (XLA's memory_analysis),
XLA's FLOP count and the compile time of each program.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
from unittest import mock

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import fit_table  # noqa: E402  (benchmarks/fit_table.py: the configs and their slices)

KEYS = ('total_gib', 'temp_gib', 'argument_gib', 'output_gib', 'flops_per_device',
        'compile_s', 'error')
VARIANTS = ('psd_jax layers', 'flax LayerNorm', 'flax DenseGeneral')


def flax_dense(features, in_axes: int = 1, dtype=None, kernel_init=None, bias_init=None,
               name=None):
    """flax's DenseGeneral with psd_jax.models.dense.Dense's arguments."""
    import flax.linen as nn
    import jax.numpy as jnp
    return nn.DenseGeneral(features=features, axis=tuple(range(-in_axes, 0)), dtype=dtype,
                           param_dtype=jnp.float32, kernel_init=kernel_init,
                           bias_init=bias_init, name=name)


def swap(variant: str):
    """A patch of psd_jax.models.layers that puts flax's layer in (a no-op for the first)."""
    import flax.linen as nn

    from psd_jax.models import layers
    if variant == 'flax LayerNorm':
        return mock.patch.object(layers, 'LayerNorm', nn.LayerNorm)
    if variant == 'flax DenseGeneral':
        return mock.patch.object(layers, 'Dense', flax_dense)
    return contextlib.nullcontext()


def compile_variant(name: str, global_batch: int, variant: str) -> dict:
    """One compile of `name`'s train step on its slice with `variant`'s layers."""
    from psd_jax import compile_check
    devices, label, hbm = compile_check.devices_for(fit_table.TOPOLOGY[name], 0)
    config = fit_table.load(name, {})
    batch = global_batch or config.data.global_batch
    with swap(variant):
        numbers = compile_check.compile_for(config, devices, batch, 0)
    row = {'variant': variant, 'config': name, 'topology': label, 'hbm_gib': hbm,
           'global_batch': batch, **{k: numbers[k] for k in KEYS if k in numbers}}
    row['fits'] = 'total_gib' in row and row['total_gib'] <= hbm
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='psd_cc3m_vitb32', choices=list(fit_table.TOPOLOGY))
    parser.add_argument('--global_batch', type=int, default=0,
                        help='default: the config\'s own global batch')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'layers_tpu.json'))
    args = parser.parse_args()
    from psd_jax import provenance
    result = {**provenance.record('python benchmarks/layers_tpu.py'), 'rows': []}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        row = compile_variant(args.config, args.global_batch, variant)
        size = (f'{row["total_gib"]:.3f} GiB/device (temporaries {row["temp_gib"]:.3f}), '
                f'{row["flops_per_device"] / 1e12:.3f} XLA TFLOP/device'
                if 'total_gib' in row else row.get('error', ''))
        print(f'{variant:>18}: {size}, compiled in {row["compile_s"]:.0f} s', flush=True)
        result['rows'].append(row)
        out.write_text(json.dumps(result, indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
