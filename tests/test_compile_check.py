"""python -m psd_jax.compile_check: the train step compiled ahead of time, on the CPU stand-in
always and for a TPU topology when libtpu is installed; slice names and bad input."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from psd_jax import compile_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'configs' / 'tiny_test.py')


def run(*args, tpu=False):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8 '
               '--xla_backend_optimization_level=0')
    if tpu:  # as a user runs it: JAX looks for every backend, TPU included
        env.pop('JAX_PLATFORMS', None)
    else:
        env['JAX_PLATFORMS'] = 'cpu'
    return subprocess.run([sys.executable, '-m', 'psd_jax.compile_check', f'--config={CONFIG}',
                           *args], env=env, capture_output=True, text=True, timeout=300)


def test_slice_names_map_to_topologies():
    assert compile_check.topology_name('v4-128') == 'v4:4x4x4'  # 128 cores = 64 chips
    assert compile_check.topology_name('v5p-128') == 'v5p:4x4x4'
    assert compile_check.topology_name('v5e-256') == 'v5e:16x16'
    assert compile_check.topology_name('v6e-8') == 'v6e:2x4'
    assert compile_check.topology_name('v4:2x2x2') == 'v4:2x2x2'
    with pytest.raises(ValueError, match=r"--topology='v9-8' is not known; .* \['v4', 'v5e'"):
        compile_check.topology_name('v9-8')
    with pytest.raises(ValueError, match=r"'v4-6': 3 chips is not a standard v4 slice"):
        compile_check.topology_name('v4-6')


@pytest.mark.parametrize('name, per_core, devices, hbm', [
    ('v4-128', False, 64, 32.0),    # megacore: one device per chip, as JAX presents a v4
    ('v4-128', True, 128, 16.0),    # libtpu's per-TensorCore layout, only when asked
    ('v5p-128', False, 64, 95.0),
    ('v5p-8', True, 8, 47.5),
    ('v5e-256', False, 256, 16.0),  # one core per chip: per_core changes nothing
    ('v5e-256', True, 256, 16.0),
    ('v6e-8', False, 8, 32.0),
    ('v4:2x2x2', False, 8, 32.0),
])
def test_slices_as_jax_presents_them(name, per_core, devices, hbm):
    layout = compile_check.slice_layout(name, per_core)
    assert (layout['devices'], layout['hbm_gib']) == (devices, hbm)
    assert layout['chips'] * {'v4': 32, 'v5p': 95, 'v5e': 16, 'v6e': 32}[
        layout['topology'].split(':')[0]] == devices * hbm  # the slice's HBM, however split
    with pytest.raises(ValueError, match=r"TPU kind 'v3' is not known"):
        compile_check.slice_layout('v3:2x2')


def test_cpu_stand_in_reports_and_fails_when_over_the_limit():
    result = run()
    assert result.returncode == 0, result.stderr[-2000:]
    assert '8 x cpu (stand-in: no TPU)' in result.stdout and 'total GiB/device' in result.stdout
    assert 'model TFLOP/device' in result.stdout and 'peak host GiB' in result.stdout
    tight = run('--hbm_gib=0.001')
    assert tight.returncode == 1 and 'DOES NOT FIT' in tight.stdout, tight.stdout[-2000:]
    bad = run('--topology=v9-8')
    assert bad.returncode == 2 and "--topology='v9-8' is not known" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason="libtpu not installed (pip install -e '.[aot]')")
def test_tpu_topology_compiles_and_reports_hbm():
    result = run('--topology=v4-8', '--config.data.global_batch=64', tpu=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'v4-8 (4 x TPU v4, one device per chip)' in result.stdout
    assert 'HBM GiB/device: 32.0 -> fits' in result.stdout
    cores = run('--topology=v4-8', '--per_core', '--config.data.global_batch=64', tpu=True)
    assert cores.returncode == 0, cores.stderr[-2000:]
    assert 'v4-8 (8 x TPU v4, one device per TensorCore)' in cores.stdout
    assert 'HBM GiB/device: 16.0 -> fits' in cores.stdout
    # libtpu's complaints about the TPU host it cannot find are held back off a TPU host
    assert 'TPU_WORKER_HOSTNAMES' not in result.stderr, result.stderr[-2000:]
    # nor JAX's INFO line that no TPU backend could be started on this machine
    assert 'Unable to initialize backend' not in result.stderr, result.stderr[-2000:]


def test_max_batch_bisects_to_the_largest_batch_under_the_limit(monkeypatch, devices):
    """--max_batch's search, on a program whose size grows with the batch (stubbed: the CPU
    compiler's buffer sizes are not monotone in the batch, a TPU's are what matters): the
    answer fits, the next multiple of the data shards (x train.micro_batches) does not, and
    a program the compiler refuses (RESOURCE_EXHAUSTED) counts as not fitting."""
    def size(batch):
        return 0.5 + 0.001 * batch

    def fake_compile(config, devices, batch, dataset_size):
        if batch > 4000:
            return {'global_batch': batch, 'fits': False, 'error': 'RESOURCE_EXHAUSTED',
                    'compile_s': 0.0}
        return {'global_batch': batch, 'fits': None, 'total_gib': size(batch), 'compile_s': 0.0}

    monkeypatch.setattr(compile_check, 'compile_for', fake_compile)
    config = compile_check_config()
    for limit, expected in ((1.0, 496), (3.0, 2496), (100.0, 4000)):
        tried = []
        best = compile_check.largest_batch(config, devices, limit, 0, 64,
                                           on_try=lambda n: tried.append(n['global_batch']))
        assert best == expected, (limit, best, tried)
        assert tried[:2] == [64, 128]
    config.train.micro_batches = 4
    assert compile_check.largest_batch(config, devices, 1.0, 0, 64) == 480  # multiples of 32
    rough = compile_check.largest_batch(config, devices, 3.0, 0, 64, precision=0.25)
    assert rough % 32 == 0 and size(rough) <= 3.0 and rough >= 0.75 * 2496


def compile_check_config():
    import importlib.util as util
    spec = util.spec_from_file_location('tiny_test', CONFIG)
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.mesh.data, config.mesh.fsdp = 8, 1
    return config
