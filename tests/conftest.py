"""Test setup: 8 emulated CPU devices and JAX's persistent compilation cache.

Both must be set before the first JAX computation, so they live here, at import time of the
test session. Meshes of 1, 2 and 4 devices are built from subsets of the 8. Compilation
dominates test time on tiny models, so the CPU backend compiles at LLVM optimisation level 0
(about a third less wall time; the programs, and so the numerics, are the same HLO).
"""

import os
import pathlib

_flags = os.environ.get('XLA_FLAGS', '')
for _flag in ('--xla_force_host_platform_device_count=8', '--xla_backend_optimization_level=0'):
    if _flag.split('=')[0] not in _flags:
        _flags += ' ' + _flag
os.environ['XLA_FLAGS'] = _flags.strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

CACHE = pathlib.Path(os.environ.get('PSD_JAX_TEST_CACHE',
                                    pathlib.Path.home() / '.cache' / 'psd_jax' / 'jax_cache'))
CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update('jax_compilation_cache_dir', str(CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def with_compile_cache(env: dict) -> dict:
    """`env` for a subprocess that shares this session's persistent compilation cache (the
    tiny config's step compiles once for the many runs the tests start)."""
    return dict(env, JAX_COMPILATION_CACHE_DIR=str(CACHE),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5',
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


@pytest.fixture(scope='session')
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f'tests expect 8 emulated CPU devices, found {len(devs)}'
    return devs


@pytest.fixture
def seed(request) -> int:
    """A fresh seed for a test's random inputs, printed (pytest shows it when the test fails);
    PSD_JAX_TEST_SEED=<seed> reruns a failure with the same inputs."""
    value = int(os.environ.get('PSD_JAX_TEST_SEED') or np.random.SeedSequence().entropy % 2**31)
    print(f'{request.node.nodeid}: seed {value} (rerun with PSD_JAX_TEST_SEED={value})')
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """NumPy generator seeded by the printed `seed`."""
    return np.random.default_rng(seed)
