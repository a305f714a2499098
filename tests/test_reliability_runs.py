"""Faults injected into real runs of the tiny config (subprocesses, 8 CPU devices): divergence,
a changed config on resume, damaged checkpoints, a second run on the workdir, a typo found
before training, a damaged metrics file. docs/reliability.md lists them with what survives."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import jax
import numpy as np
import pytest

from psd_jax import metrics
from test_train import command, env, finished, pytestmark, run, wait_for  # noqa: F401
from test_train import restored_params

SHORT = ['--config.train.steps=6', '--config.train.checkpoint_every=2',
         '--config.train.log_every=2']


def test_divergence_is_skipped_counted_then_stopped_with_the_last_good_checkpoint(tmp_path,
                                                                                   devices):
    """A learning rate of 1e6 makes the loss non-finite within a few steps: those steps are
    not applied and are counted, three in a row stop the run (exit 3, the step named), and no
    checkpoint on disk holds a non-finite number."""
    workdir = tmp_path / 'diverged'
    result = run(workdir, '--config.optim.lr=1e6', '--config.optim.warmup_steps=1',
                 '--config.train.steps=40', '--config.train.checkpoint_every=2',
                 '--config.train.log_every=1', '--config.train.nonfinite_limit=3')
    assert result.returncode == 3, result.stderr[-3000:]
    assert 'training diverged: 3 steps in a row up to step' in result.stderr
    assert not (workdir / 'final_metrics.json').exists()
    records = metrics.read_metrics(workdir / 'metrics.jsonl')
    skipped = [r['step'] for r in records if r.get('skipped')]
    assert len(skipped) == 3 and records[-1]['skipped_total'] == 3
    assert all(not np.isfinite(r['loss']) or not np.isfinite(r['grad_norm'])
               for r in records if r.get('skipped'))
    steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    assert steps and steps[-1] < skipped[-1]
    for at in steps:
        params, _ = restored_params(workdir, {'data': 8}, devices, step_number=at)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), at


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A 6-step run with checkpoints 2, 4 and 6: the reference for resumes."""
    workdir = tmp_path_factory.mktemp('reference') / 'run'
    result = run(workdir, *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.parametrize('override,key', [
    ('--config.loss.kind=clip', "config.loss.kind: 'psd' -> 'clip'"),
    ('--config.data.global_batch=64', 'config.data.global_batch: 32 -> 64'),
    ('--config.seed=3', 'config.seed: 0 -> 3'),
    ('--config.loss.psd.teacher=second_pass', "config.loss.psd.teacher: 'ema' -> 'second_pass'"),
    ('--config.model.embed_dim=32', 'config.model.embed_dim: 0 -> 32'),
    ('--config.train.steps=4', 'config.train.steps=4 is below'),
])
def test_a_resume_with_another_run_config_is_refused_naming_the_key(tmp_path, finished_run,
                                                                    override, key):
    workdir = tmp_path / 'run'
    shutil.copytree(finished_run, workdir)
    before = (workdir / 'config.json').read_bytes()
    result = run(workdir, *SHORT, override)
    assert result.returncode == 2 and key in result.stderr, result.stderr[-2000:]
    assert (workdir / 'config.json').read_bytes() == before
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4', '6']


def damage(checkpoint, how):
    """Damage one checkpoint directory the way a crash or a bad disk would."""
    data_files = sorted((checkpoint / 'state').rglob('d/*'), key=lambda p: p.stat().st_size)
    if how == 'state_item_removed':
        shutil.rmtree(checkpoint / 'state')
    elif how == 'data_file_truncated':
        blob = data_files[-1].read_bytes()
        data_files[-1].write_bytes(blob[:len(blob) * 6 // 10])
    elif how == 'bytes_overwritten':
        blob = bytearray(data_files[-1].read_bytes())
        middle = len(blob) // 2
        blob[middle:middle + 256] = np.random.default_rng(0).bytes(256)
        data_files[-1].write_bytes(bytes(blob))
    elif how == 'iterator_json_emptied':
        next((checkpoint / 'data').glob('process_*.json')).write_text('')
    elif how == 'step_directory_emptied':
        shutil.rmtree(checkpoint)
        checkpoint.mkdir()


@pytest.mark.parametrize('how', ['state_item_removed', 'data_file_truncated',
                                 'bytes_overwritten', 'iterator_json_emptied',
                                 'step_directory_emptied'])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, finished_run, devices,
                                                                 how):
    """Checkpoint 6 removed and 4 damaged: the run says why 4 failed, resumes from 2, sets 4
    aside, and its step-6 state equals the uninterrupted run's bit for bit."""
    workdir = tmp_path / 'run'
    shutil.copytree(finished_run, workdir)
    shutil.rmtree(workdir / 'checkpoints' / '6')
    damage(workdir / 'checkpoints' / '4', how)
    result = run(workdir, *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resumed from step 2' in result.stderr, result.stderr[-3000:]
    if how != 'step_directory_emptied':  # an empty folder is no checkpoint to report
        assert 'checkpoint 4 in' in result.stderr and 'cannot be restored' in result.stderr
    assert list((workdir / 'damaged_checkpoints').iterdir())
    want, _ = restored_params(finished_run, {'data': 8}, devices, step_number=6)
    got, _ = restored_params(workdir, {'data': 8}, devices, step_number=6)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path):
    workdir = tmp_path / 'busy'
    first = subprocess.Popen(command(workdir, '--config.train.steps=100000',
                                     '--config.train.checkpoint_every=2'), env=env(),
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        wait_for(first, lambda: finished(workdir, 2))
        second = run(workdir, '--config.train.steps=100000', timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f'in use by pid {first.pid}' in second.stderr
        lines = metrics.read_metrics(workdir / 'metrics.jsonl', merge=False)
        assert len({r['step'] for r in lines}) == len(lines)  # one run's lines only
    finally:
        first.kill()
        first.wait()


def test_an_eval_split_typo_is_refused_before_the_first_step(tmp_path):
    workdir = tmp_path / 'typo'
    start = time.time()
    result = run(workdir, '--config.eval.split=twiter',
                 "--config.eval.evaluators=('retrieval',)")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "config.eval.split='twiter'" in result.stderr and 'twitter' in result.stderr
    assert not (workdir / 'metrics.jsonl').exists() and not (workdir / 'checkpoints').exists()
    assert time.time() - start < 60


def test_damaged_metrics_lines_are_skipped_and_a_resume_logs_each_step_once(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in (2, 4, 6))
                    + '{"step": 8, "lo')  # a kill in the middle of a write
    assert [r['step'] for r in metrics.read_metrics(path)] == [2, 4, 6]
    writer = metrics.MetricsWriter(tmp_path, total_steps=10, start_step=4, tensorboard=False)
    writer.write(6, {'loss': 0.5})
    writer.close()
    records = metrics.read_metrics(path, merge=False)
    assert [(r['step'], r['loss']) for r in records] == [(2, 0.5), (4, 0.25), (6, 0.5)]


def test_older_checkpoints_are_deleted_only_once_the_newest_reads_back(tmp_path, finished_run):
    from psd_jax import checkpointing

    workdir = tmp_path / 'run'
    shutil.copytree(finished_run, workdir)
    (workdir / 'checkpoints' / '6' / 'config' / 'metadata').write_text('')  # damaged newest
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1)
    assert ckpt.prune() == [] and ckpt.manager.all_steps() == [2, 4, 6]
    ckpt.close()
    shutil.rmtree(workdir)
    shutil.copytree(finished_run, workdir)
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1, keep_every=4)
    assert ckpt.prune() == [2] and sorted(ckpt.manager.all_steps()) == [4, 6]
    ckpt.close()


def test_a_resume_may_switch_on_every_memory_lever(tmp_path, finished_run, devices):
    """Checkpoint 2 of the reference, resumed with scanned layers (its layout converted on
    restore), full remat and two GradCache micro-batches (the EMA teacher's forward
    micro-batched too), reaches the reference's step 6: the levers change memory, not the
    run. Tolerance: the same arithmetic in another order over 4 steps, 99% of the parameters
    within lr / 10 (as tests/test_step.py), every one within 10 lr."""
    workdir = tmp_path / 'levers'
    shutil.copytree(finished_run, workdir)
    for at in (4, 6):
        shutil.rmtree(workdir / 'checkpoints' / str(at))
    result = run(workdir, *SHORT, '--config.model.scan_layers=True', '--config.model.remat=full',
                 '--config.train.micro_batches=2')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'config.model.scan_layers changed since the checkpoint: False -> True' in (
        result.stderr)
    reference, _ = restored_params(finished_run, {'data': 8}, devices, step_number=6)
    levers, at = restored_params(workdir, {'data': 8}, devices, step_number=6)
    assert at == 6
    assert jax.tree.structure(reference) == jax.tree.structure(levers)
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
        jax.tree.leaves(reference), jax.tree.leaves(levers))])
    assert np.quantile(diff, 0.99) <= 1e-4 and diff.max() <= 1e-2, (
        np.quantile(diff, 0.99), diff.max())
