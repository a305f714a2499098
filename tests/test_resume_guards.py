"""What a resume may not do silently, as a user meets it in real runs of the tiny config
(subprocesses, 8 CPU devices): train on other data than it started with, lose SIGTERM outside
the step loop, or log a finished run's evaluation twice."""

from __future__ import annotations

import io
import json
import pathlib
import shutil
import signal
import subprocess
import tarfile

import pytest
from PIL import Image

from psd_jax.data import fetch
from test_train import command, env, pytestmark, run, wait_for  # noqa: F401

SOURCES = fetch.cache_dir() / 'emoji_sources'


def write_shards(root: pathlib.Path, entries: list[dict], per_shard: int, first: int = 0):
    """img2dataset-style tar shards of real emoji art (Google's set, 64 px, as JPEG) and
    captions, `per_shard` pairs each, named from shard number `first` on."""
    from psd_jax.data.emoji import png_on_white
    folder = SOURCES / 'emoji-datasource-google' / 'package' / 'img' / 'google' / '64'
    root.mkdir(parents=True, exist_ok=True)
    for n in range(len(entries) // per_shard):
        with tarfile.open(root / f'{first + n:05d}.tar', 'w') as tar:
            for i, entry in enumerate(entries[n * per_shard:(n + 1) * per_shard]):
                out = io.BytesIO()
                Image.open(png_on_white(folder / entry['image'])).save(out, format='JPEG')
                for name, data in ((f'{i:05d}.jpg', out.getvalue()),
                                   (f'{i:05d}.txt', f'an emoji of {entry["label"]}'.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def emoji_entries():
    from psd_jax.data.emoji import load_metadata
    entries, _, _ = load_metadata(SOURCES)
    return entries


def test_changed_training_data_is_refused_by_name_and_accepted_deliberately(tmp_path,
                                                                            emoji_entries):
    """A run on its own shards (2 x 40 pairs), checkpoints 2 and 4. The shards replaced by 80
    other pairs (the same count): the resume is refused before anything is written, naming
    the data and what changed. A shard added: refused as a data change too, the intact
    checkpoints kept. With resume_allow_changes=('data',) it goes on, its data order starting
    again at the checkpoint's step, and config_history.jsonl records the change."""
    data, workdir = tmp_path / 'shards', tmp_path / 'run'
    write_shards(data, emoji_entries[:80], 40)
    own = ['--config.data.dataset=image_text_shards', f'--config.data.path={data}',
           '--config.data.builder_config=mine', f'--config.data.data_dir={tmp_path / "tfds"}',
           '--config.data.train_split=train', '--config.train.checkpoint_every=2']
    first = run(workdir, *own, '--config.train.steps=4')
    assert first.returncode == 0, first.stderr[-3000:]
    config_before = (workdir / 'config.json').read_bytes()

    shutil.rmtree(data)
    write_shards(data, emoji_entries[80:160], 40)  # other pairs, the same count
    swapped = run(workdir, *own, '--config.train.steps=6')
    assert swapped.returncode == 2, swapped.stderr[-3000:]
    error = next(line for line in swapped.stderr.splitlines() if line.startswith('error: '))
    assert 'the prepared data changed since step 4' in error and 'source fingerprint' in error
    assert str(data) in error and "resume_allow_changes=\"('data',)\"" in error, error
    assert (workdir / 'config.json').read_bytes() == config_before
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']

    write_shards(data, emoji_entries[160:200], 40, first=2)  # a shard added
    added = run(workdir, *own, '--config.train.steps=6')
    assert added.returncode == 2, added.stderr[-3000:]
    assert 'records 80 -> 120' in added.stderr and 'cannot be restored' not in added.stderr
    assert not (workdir / 'damaged_checkpoints').exists()

    (data / '00002.tar').unlink()
    accepted = run(workdir, *own, '--config.train.steps=6',
                   "--config.train.resume_allow_changes=('data',)")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert 'the training data changed since step 4' in accepted.stderr
    assert 'its order starts again at global batch 4' in accepted.stderr
    history = [json.loads(line) for line in
               (workdir / 'config_history.jsonl').read_text().splitlines()]
    assert history[-1]['from_step'] == 4 and 'data' in history[-1]['changed']
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4', '6']


def terminate_when(workdir, text: str, *overrides) -> subprocess.CompletedProcess:
    """Start a run, send SIGTERM once its console shows `text`, return how it ended."""
    log = workdir.parent / f'{workdir.name}.stderr'
    with open(log, 'w') as err:
        proc = subprocess.Popen(command(workdir, *overrides), env=env(), stderr=err,
                                stdout=subprocess.DEVNULL, text=True)
        wait_for(proc, lambda: text in log.read_text())
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, '', log.read_text())


EVALUATE = ["--config.eval.evaluators=('retrieval','linear_probe')",
            '--config.eval.probe_examples=4000', '--config.eval.batch=64']


def test_sigterm_outside_the_step_loop_exits_143_saying_what_was_saved(tmp_path):
    """SIGTERM while starting and during the final evaluation: exit 143, the lock released, one
    line saying what was saved; the run then finishes when started again, and a finished run
    started again changes nothing (its evaluation is not logged twice)."""
    workdir = tmp_path / 'run'
    started = terminate_when(workdir, '] mesh ', *EVALUATE)
    assert started.returncode == 143, started.stderr[-3000:]
    assert 'SIGTERM while starting: nothing new was saved (no checkpoint yet)' in started.stderr
    assert not (workdir / 'lock.json').exists()

    evaluating = terminate_when(workdir, 'checkpoint 6 committed', *EVALUATE)
    assert evaluating.returncode == 143, evaluating.stderr[-3000:]
    assert ('SIGTERM during the final evaluation: the final checkpoint 6 is committed'
            in evaluating.stderr), evaluating.stderr[-3000:]
    assert not (workdir / 'lock.json').exists()
    assert not (workdir / 'final_metrics.json').exists()

    finished = run(workdir, *EVALUATE)
    assert finished.returncode == 0, finished.stderr[-3000:]
    final = json.loads((workdir / 'final_metrics.json').read_text())
    lines = (workdir / 'metrics.jsonl').read_text()
    assert lines.count('eval/retrieval/') and sum(
        'eval/retrieval/i2t_R@1' in line for line in lines.splitlines()) == 1
    again = run(workdir, *EVALUATE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'the run is complete (step 6 of 6)' in again.stderr
    assert (workdir / 'metrics.jsonl').read_text() == lines
    assert json.loads((workdir / 'final_metrics.json').read_text()) == final
