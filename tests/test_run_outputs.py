"""What a finished run gives to the tools after it, from one tiny run made with
--config.model.* flags and a benchmark suite: the suite's table in the loop, the same numbers
from `python -m psd_jax.evaluate --suite`, and `python -m psd_jax.export` reading the run's own
config (a disagreeing --config refused in one line; files readable by others)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import with_compile_cache
from psd_jax import pretrained
from psd_jax.data import fetch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'configs' / 'tiny_test.py')
CACHE = fetch.cache_dir()
pytestmark = pytest.mark.skipif(
    not ((CACHE / 'emoji_sources' / '.complete').exists()
         and (CACHE / 'openmoji_sources' / '.complete').exists()
         and (CACHE / fetch.METADATA_NAME).is_file()),
    reason='emoji / openmoji data or zero-shot metadata absent: run `python -m psd_jax.data.fetch`')
MODEL_FLAGS = ['--config.model.embed_dim=48', '--config.model.act=gelu']


def env() -> dict:
    return with_compile_cache(dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
        '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')))


def python(*args, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('run')
    result = python('-m', 'psd_jax.main', f'--config={CONFIG}', f'--workdir={workdir}',
                    '--config.train.steps=2', '--config.eval.evaluators=()',
                    '--config.metrics.tensorboard=False', '--config.eval.suite=emoji,emoji_styles',
                    *MODEL_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_the_suite_table_in_the_loop(run):
    workdir, result = run
    table = json.loads((workdir / 'eval' / 'suite_step_2.json').read_text())
    assert [b['name'] for b in table['benchmarks']] == ['emoji', 'emoji_styles']
    final = json.loads((workdir / 'final_metrics.json').read_text())
    assert final['eval/suite/average'] == table['average']
    assert 'eval/suite/average' in result.stderr  # the console line carries the average
    markdown = (workdir / 'eval' / 'suite_step_2.md').read_text()
    assert '| emoji | zero_shot |' in markdown and '| emoji_styles | retrieval |' in markdown


def test_the_suite_standalone_gives_the_same_numbers(run, tmp_path):
    workdir, _ = run
    in_loop = json.loads((workdir / 'eval' / 'suite_step_2.json').read_text())
    result = python('-m', 'psd_jax.evaluate', f'--config={CONFIG}', f'--workdir={workdir}',
                    '--suite=emoji_styles,emoji', *MODEL_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = json.loads((workdir / 'eval' / 'suite_step_2.json').read_text())
    assert [b['name'] for b in alone['benchmarks']] == ['emoji_styles', 'emoji']
    by_name = {b['name']: b['metrics'] for b in alone['benchmarks']}
    for row in in_loop['benchmarks']:
        for metric, value in row['metrics'].items():
            assert by_name[row['name']][metric] == pytest.approx(value, abs=1e-6)
    assert json.loads(result.stdout)['eval/suite/average'] == pytest.approx(alone['average'])


def test_export_reads_the_runs_config_and_writes_readable_files(run, tmp_path):
    """The run was made with --config.model.* flags: export needs none of them; a --config
    that disagrees is refused in one line naming the key."""
    from configs.tiny_test import get_config
    from psd_jax.export import run_config
    workdir, _ = run
    out = tmp_path / 'exported'
    with pytest.raises(ValueError) as refused:  # main prints it as one `error:` line, exit 2
        run_config(str(workdir), get_config())
    message = str(refused.value)
    assert '\n' not in message and len(message) < 400, message  # not a tree-mismatch dump
    assert 'model.act' in message and "'gelu' in the run" in message, message
    assert run_config(str(workdir)).model.embed_dim == 48
    exported = python('-m', 'psd_jax.export', f'--workdir={workdir}', f'--out={out}')
    assert exported.returncode == 0, exported.stderr[-3000:]
    cfg = json.loads((out / pretrained.CONFIG_NAME).read_text())['model_cfg']
    assert cfg['embed_dim'] == 48 and cfg['quick_gelu'] is False
    for name in (pretrained.WEIGHTS_NAME, pretrained.CONFIG_NAME):
        mode = (out / name).stat().st_mode
        assert mode & 0o044 == out.stat().st_mode & 0o044, (name, oct(mode))
    assert (out / pretrained.WEIGHTS_NAME).stat().st_mode & 0o004  # readable by others
