"""MFU's peak: the config's value first, else the table by device kind and compute dtype,
else a matmul probe on CPUs; unknown accelerators report none. Bad profile_steps are named."""

from __future__ import annotations

import types

import jax
import pytest

from psd_jax import config as config_lib
from psd_jax.training import mfu


def test_peaks_by_device_kind_and_dtype():
    assert mfu.table_peak('TPU v4', 'bfloat16') == 275e12
    assert mfu.table_peak('TPU v5 lite', 'bfloat16') == 197e12  # v5e, not v5p
    assert mfu.table_peak('TPU v5', 'bfloat16') == 459e12
    assert mfu.table_peak('NVIDIA H100 80GB HBM3', 'float32') == 494e12  # TF32
    assert mfu.table_peak('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312e12
    assert mfu.table_peak('cpu', 'float32') is None


def test_peak_sources_and_the_ratio(devices):
    gpu = types.SimpleNamespace(device_kind='NVIDIA H200', platform='gpu')
    assert mfu.peak_flops(1e12, gpu, 'bfloat16') == (1e12, 'metrics.peak_flops_per_device')
    assert mfu.peak_flops(0.0, gpu, 'bfloat16')[0] == 989e12
    unknown = types.SimpleNamespace(device_kind='Some accelerator', platform='other')
    peak, why = mfu.peak_flops(0.0, unknown, 'bfloat16')
    assert peak is None and 'metrics.peak_flops_per_device' in why
    probed, why = mfu.peak_flops(0.0, devices[0], 'float32')
    assert 1e8 < probed < 1e13 and 'probe' in why  # a CPU core does 1-100 GFLOP/s
    assert mfu.mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)
    assert mfu.mfu(0.0, 0.5, 8e12) is None and mfu.mfu(1.0, 0.5, None) is None
    compiled = jax.jit(lambda a: a @ a).lower(jax.numpy.ones((64, 64))).compile()
    assert mfu.step_flops(compiled) == pytest.approx(2 * 64 ** 3, rel=0.05)


@pytest.mark.parametrize('value', [(0, 2), (3, 2), (1, 2, 3), (1, 1000)])
def test_bad_profile_steps_are_named(value):
    config = config_lib.base_config()
    config.train.profile_steps = value
    with pytest.raises(ValueError, match='train.profile_steps'):
        config_lib.validate(config)
