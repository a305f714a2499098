"""benchmarks/gpu_check.py's dry run: every stage at tiny sizes on the CPU, so that the check
works when an accelerator is lent (its figures are meaningless here; the shape of the JSON and
the stages' plumbing are what is checked)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from conftest import with_compile_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_stage(tmp_path):
    env = with_compile_cache(dict(os.environ, JAX_PLATFORMS='cpu',
                                  XLA_FLAGS='--xla_backend_optimization_level=0'))
    out = tmp_path / 'gpu_check.json'
    done = subprocess.run(
        [sys.executable, str(ROOT / 'benchmarks' / 'gpu_check.py'), '--dry_run',
         '--out', str(out), '--work', str(tmp_path / 'work'), '--stages', 'step_time',
         'loss_memory', 'vs_open_clip', 'protocol'],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    stages = result['stages']
    step = stages['step_time'][0]
    assert step['model'] == 'tiny' and step['ms_per_step'] > 0 and 0 < step['mfu'] < 1
    assert step['hfu'] > 0 and step['model_tflop_per_device'] > 0
    assert [r['loss.impl'] for r in stages['loss_memory']] == ['all_gather', 'ring']
    assert 'skipped' in stages['vs_open_clip'] or 'rows' in stages['vs_open_clip']
    runs = stages['protocol']
    assert [(r['loss'], r['exit']) for r in runs] == [('clip', 0), ('psd', 0)], runs
    assert all('eval/retrieval/i2t_R@1' in r['final_metrics'] for r in runs)
