"""The trainer end to end, in subprocesses on 8 emulated CPU devices: an interrupted run
(SIGKILL) resumes to the same parameters and data order as an uninterrupted one; SIGTERM
checkpoints and exits cleanly; a checkpoint restores onto a smaller mesh; config errors are one
line naming the key. The step loop runs under jax_transfer_guard='disallow'."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import with_compile_cache
from psd_jax import config as config_lib, sharding
from psd_jax.persistence import checkpointing, layout

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'configs' / 'tiny_test.py')
FAST = ['--config.eval.evaluators=()', '--config.train.transfer_guard=disallow',
        '--config.metrics.tensorboard=False']

pytestmark = pytest.mark.skipif(
    not (pathlib.Path(os.environ.get('PSD_JAX_CACHE', pathlib.Path.home() / '.cache' /
                                     'psd_jax')) / 'emoji_sources' / '.complete').exists(),
    reason='emoji data absent: run `python -m psd_jax.data.fetch`')


def env():
    out = dict(os.environ)
    out['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8 '
                        '--xla_backend_optimization_level=0')
    out['JAX_PLATFORMS'] = 'cpu'
    return with_compile_cache(out)


def command(workdir, *overrides):
    return [sys.executable, '-m', 'psd_jax.main', f'--config={CONFIG}', f'--workdir={workdir}',
            *FAST, *overrides]


def run(workdir, *overrides, timeout=300):
    return subprocess.run(command(workdir, *overrides), env=env(), capture_output=True,
                          text=True, timeout=timeout)


def finished(workdir, step_number):
    folder = pathlib.Path(workdir) / 'checkpoints' / str(step_number)
    return folder.is_dir() and not any('tmp' in p.name for p in folder.parent.iterdir()
                                       if p.name.startswith(str(step_number)))


def wait_for(proc, predicate, timeout=240):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f'process ended early:\n{proc.stderr.read()[-3000:]}')
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError('timed out waiting')
        time.sleep(0.2)


def restored_params(workdir, mesh_axes, devices, strategy='replicated', teacher=None,
                    step_number=None):
    config = _tiny_config()
    if teacher:
        config.loss.psd.teacher = teacher
    setup = config_lib.step_setup(config, sharding.make_mesh(mesh_axes, devices))
    ckpt = checkpointing.Checkpointer(workdir, asynchronous=False)
    abstract, to_plain = layout.restore_plan(setup, strategy, ckpt.restore_config(step_number))
    state, at = ckpt.restore(abstract, None, step_number)  # in the layout it was written with
    state = to_plain(state)
    ckpt.close()
    return jax.device_get(state.params), at


def _tiny_config():
    import importlib.util
    spec = importlib.util.spec_from_file_location('tiny_test', CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def losses_by_step(workdir):
    out = {}
    for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
        record = json.loads(line)
        if 'loss' in record:
            out[record['step']] = record['loss']
    return out


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, devices):
    """With the previous-step teacher, whose state (the carried embeddings) and data order (each
    batch repeats part of the last) both have to survive the kill."""
    steps = ['--config.train.steps=8', '--config.loss.psd.teacher=previous_step']
    straight = run(tmp_path / 'straight', *steps)
    assert straight.returncode == 0, straight.stderr[-3000:]

    interrupted = tmp_path / 'interrupted'
    proc = subprocess.Popen(command(interrupted, *steps), env=env(), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    wait_for(proc, lambda: finished(interrupted, 4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished(interrupted, 8), 'the run ended before it could be killed'
    resumed = run(interrupted, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed from step' in resumed.stderr

    a, at_a = restored_params(tmp_path / 'straight', {'data': 8}, devices,
                              teacher='previous_step')
    b, at_b = restored_params(interrupted, {'data': 8}, devices, teacher='previous_step')
    assert at_a == at_b == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # bit-exact: same program, same data, same order
    la, lb = losses_by_step(tmp_path / 'straight'), losses_by_step(interrupted)
    assert la[8] == lb[8] and la[6] == lb[6]  # the resumed run saw the same batches
    records = [json.loads(x) for x in (interrupted / 'metrics.jsonl').read_text().splitlines()]
    repeated = {r['step']: r['subset_size'] for r in records if 'subset_size' in r}
    assert repeated and all(v == 16 for k, v in repeated.items() if k > 1), repeated

    # the same checkpoint restored onto 4 devices, parameters FSDP-sharded, is the same state
    c, _ = restored_params(interrupted, {'data': 2, 'fsdp': 2}, devices[:4], 'fsdp',
                           teacher='previous_step')
    for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(c)):
        np.testing.assert_array_equal(x, y)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    workdir = tmp_path / 'term'
    proc = subprocess.Popen(command(workdir, '--config.train.steps=10000'), env=env(),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    wait_for(proc, lambda: finished(workdir, 2))
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]  # checkpointed, requeue: not a finished run
    match = re.search(r'SIGTERM: checkpointing step (\d+)', err)
    assert match, err[-3000:]
    assert (workdir / 'checkpoints' / match.group(1)).is_dir()
    assert time.time() - sent < 60


@pytest.mark.parametrize('override,expected', [
    ('--config.optim.lrr=0.1', "unknown config key 'lrr' in --config.optim.lrr: Did you mean"),
    ('--config.foo=1', "unknown config key 'foo' in --config.foo: no key of a similar name"),
    ('--config.optim.lr=fast', 'could not convert string to float'),
    ('--config.data.global_batch=12', 'config.data.global_batch size 12 does not divide'),
    ('--config.loss.psd.teacher=momentum', "psd.teacher='momentum' is not known"),
    ('--config.train.checkpoint_every=0', 'config.train.checkpoint_every: 0: must be >= 1'),
    ('--config.train.keep_checkpoints=0', 'config.train.keep_checkpoints: 0: must be >= 1'),
    ("--config.eval.evaluators=('retrieval','zeroshot')",
     "config.eval.evaluators: 'zeroshot' is not known"),
    ('--config.train.nonfinite=ignore', "config.train.nonfinite: 'ignore' is not one of"),
    ('--config.data.dataset=image_text_shards', 'set --config.data.path'),
])
def test_config_errors_are_one_line(tmp_path, override, expected):
    result = run(tmp_path / 'bad', override, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert result.stderr.count(expected) == 1, result.stderr[-2000:]  # said once, not logged too


def test_standalone_evaluation_reproduces_the_in_loop_numbers(tmp_path):
    """The evaluators and a benchmark suite (emoji_styles: another dataset than the training
    one) in the loop, then standalone on the checkpoint: the same numbers; the suite's table
    is written both times."""
    workdir = tmp_path / 'eval'
    evaluators = "--config.eval.evaluators=('retrieval','zero_shot')"
    suite = '--config.eval.suite=emoji_styles'
    trained = subprocess.run(
        [sys.executable, '-m', 'psd_jax.main', f'--config={CONFIG}', f'--workdir={workdir}',
         '--config.train.steps=4', evaluators, suite, '--config.metrics.tensorboard=False',
         '--config.train.profile_steps=(2,3)'],
        env=env(), capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    in_loop = json.loads((workdir / 'final_metrics.json').read_text())
    # MFU against a CPU matmul probe: emulated devices share the cores, so well below 1
    assert 0.0 < in_loop['mfu'] < 1.0 and 'matmul probe' in trained.stderr
    assert in_loop['hfu'] > 0.0 and 'model FLOPs per step' in trained.stderr
    traces = list((workdir / 'profile').rglob('*.xplane.pb'))
    assert traces and traces[0].stat().st_size > 0  # the trace of steps 2-3
    table = json.loads((workdir / 'eval' / 'suite_step_4.json').read_text())
    assert [b['name'] for b in table['benchmarks']] == ['emoji_styles']
    assert table['average'] == in_loop['eval/suite/average'] == in_loop[
        'eval/emoji_styles/mean_R@1']
    assert 'eval/suite/average=' in trained.stderr  # on the console line of the evaluation
    (workdir / 'eval' / 'suite_step_4.json').unlink()
    standalone = subprocess.run(
        [sys.executable, '-m', 'psd_jax.evaluate', f'--config={CONFIG}', f'--workdir={workdir}',
         evaluators, suite], env=env(), capture_output=True, text=True, timeout=300)
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    report = json.loads((workdir / 'eval_step_4.json').read_text())
    assert json.loads((workdir / 'eval' / 'suite_step_4.json').read_text())['average'] == (
        pytest.approx(table['average'], abs=1e-6))
    keys = [k for k in in_loop if k.startswith('eval/')]
    assert len(keys) >= 20 and report['step'] == 4
    for key in keys:
        assert report[key] == pytest.approx(in_loop[key], abs=1e-6), key
    assert 0.0 < in_loop['eval/zero_shot/top1'] <= 1.0  # a fraction, and a model this
    # small still ranks some held-out emoji into the right one of 10 groups
    empty = subprocess.run(
        [sys.executable, '-m', 'psd_jax.evaluate', f'--config={CONFIG}',
         f'--workdir={tmp_path / "nothing"}'], env=env(), capture_output=True, text=True,
        timeout=120)
    assert empty.returncode == 2 and 'no checkpoint in' in empty.stderr
