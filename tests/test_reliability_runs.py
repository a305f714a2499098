"""Faults injected into real runs of the tiny config (subprocesses, 8 CPU devices): divergence,
a changed config on resume, damaged checkpoints, a second run on the workdir, a typo found
before training, a damaged metrics file. docs/reliability.md lists them with what survives."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import jax
import numpy as np
import pytest

from psd_jax.training import metrics
from test_train import command, env, finished, pytestmark, run, wait_for  # noqa: F401
from test_train import restored_params

SHORT = ['--config.train.steps=6', '--config.train.checkpoint_every=2',
         '--config.train.log_every=2']


def global_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(tree))))


def test_a_run_blowing_up_is_stopped_before_a_bad_checkpoint_and_names_a_good_one(tmp_path,
                                                                                   devices):
    """4 healthy steps, then the learning rate raised to 100 (a deliberate change on resume).
    Unguarded, such a run keeps a finite loss for about 13 steps while its weights grow 18x per
    step (to 1e18) and only then turns NaN, and its checkpoints hold the blown-up weights. Here
    steps 5, 6 and 7 are not applied (their update is many times the weights' norm), the
    limit of 3 is checked on every step, and the run stops at step 7 (exit 3) naming
    checkpoint 4, whose embeddings are finite; no checkpoint on disk has grown weights."""
    workdir = tmp_path / 'blowing_up'
    first = run(workdir, '--config.train.steps=4', '--config.train.log_every=1')
    assert first.returncode == 0, first.stderr[-3000:]
    result = run(workdir, '--config.optim.lr=100', '--config.train.steps=40',
                 "--config.train.resume_allow_changes=('optim.lr',)",
                 '--config.train.log_every=1', '--config.train.nonfinite_limit=3')
    assert result.returncode == 3, result.stderr[-3000:]
    error = next(line for line in result.stderr.splitlines() if line.startswith('error: '))
    assert 'training diverged: 3 steps in a row up to step 7 were not applied' in error, error
    assert "above train.max_update_ratio=1" in error, error
    assert 'checkpoint 4, saved before the trouble began, gives finite embeddings' in error
    records = metrics.read_metrics(workdir / 'metrics.jsonl')
    assert [r['step'] for r in records if r.get('skipped')] == [5, 6, 7]
    assert records[-1]['step'] == 7 and records[-1]['skipped_total'] == 3
    assert all(np.isfinite(r['loss']) and r['update_ratio'] > 1 for r in records
               if r.get('skipped'))
    assert not (workdir / 'final_metrics.json').exists()
    steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    start, _ = restored_params(workdir, {'data': 8}, devices, step_number=2)
    for at in steps:
        params, _ = restored_params(workdir, {'data': 8}, devices, step_number=at)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), at
        assert global_norm(params) < 2 * global_norm(start), at


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


LOG_LINE = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ \w+\.py:\d+\] ')
CAUSES = {'state_item_removed': ('missing file',), 'data_file_truncated': ('damaged data file',),
          'bytes_overwritten': ('damaged data file', 'fingerprint mismatch'),
          'iterator_json_emptied': ('unreadable metadata',), 'step_directory_emptied': ('',)}


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
    lines = result.stderr.splitlines()
    assert all(LOG_LINE.match(line) for line in lines), [  # no library tracebacks
        line for line in lines if not LOG_LINE.match(line)][:5]
    about = [line for line in lines if 'checkpoint 4 ' in line]
    assert len(about) == 1 and len(about[0]) < 500, about  # one line: cause and destination
    if how != 'step_directory_emptied':  # an empty folder is no checkpoint to report
        assert 'checkpoint 4 in' in about[0] and 'cannot be restored (' in about[0]
        assert any(f'restored ({cause}: ' in about[0] for cause in CAUSES[how]), about[0]
    aside = list((workdir / 'damaged_checkpoints').iterdir())
    assert len(aside) == 1 and f'moved to {aside[0]}' in about[0], about
    want, _ = restored_params(finished_run, {'data': 8}, devices, step_number=6)
    got, _ = restored_params(workdir, {'data': 8}, devices, step_number=6)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_every_checkpoint_damaged_is_one_error_line_naming_the_workdir(tmp_path, finished_run):
    """Each checkpoint damaged another way: exit 2 with one line (each checkpoint's cause, the
    directory, what to do), nothing moved, and no library traceback on the console."""
    workdir = tmp_path / 'run'
    shutil.copytree(finished_run, workdir)
    for at, how in ((2, 'data_file_truncated'), (4, 'bytes_overwritten'),
                    (6, 'state_item_removed')):
        damage(workdir / 'checkpoints' / str(at), how)
    result = run(workdir, *SHORT)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith('error: ')]
    assert len(errors) == 1 and all(LOG_LINE.match(line) for line in lines if line not in
                                    errors), lines[:20]
    assert [line for line in lines if line[0] in 'WE' and LOG_LINE.match(line)] == []
    error = errors[0]
    assert f'no checkpoint in {workdir / "checkpoints"} can be restored' in error
    for at in (2, 4, 6):
        assert f'checkpoint {at}: ' in error
    assert 'move' in error and '--workdir' in error and len(error) < 1500, error
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4', '6']
    assert not (workdir / 'damaged_checkpoints').exists()


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
    from psd_jax.persistence import checkpointing

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
