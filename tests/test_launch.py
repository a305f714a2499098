"""launch/tpu_pod.sh against a fake `gcloud` that records its arguments: the create / copy /
install / train on all workers / delete sequence, and the quoting of config overrides."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD = ROOT / 'launch' / 'tpu_pod.sh'
TRAIN = ['--config', 'configs/psd_cc3m_vitb32.py', '--config.optim.lr=5e-4',
         "--config.data.path=/data/my cc3m's copy", '--config.eval.evaluators=("retrieval",)']


def fake_gcloud(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    log = tmp_path / 'calls'
    script = bin_dir / 'gcloud'
    script.write_text(f'''#!/usr/bin/env python3
import json, sys
if sys.argv[1:3] == ['auth', 'list']:
    print('someone@example.com')
    sys.exit(0)
with open({str(log)!r}, 'a') as f:
    f.write(json.dumps(sys.argv[1:]) + '\\n')
''')
    script.chmod(0o755)
    return bin_dir, log


def pod(tmp_path, *extra):
    bin_dir, log = fake_gcloud(tmp_path)
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}')
    result = subprocess.run(
        ['bash', str(POD), '--name', 'psd-test', '--zone', 'us-central2-b', '--accelerator',
         'v4-32', '--workdir', 'gs://bucket/run 1', '--spot', *extra, '--', *TRAIN],
        env=env, capture_output=True, text=True, timeout=60)
    import json
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def check_sequence(calls):
    verbs = [c[3] for c in calls]
    assert verbs == ['create', 'scp', 'ssh', 'ssh', 'delete'], verbs
    create = calls[0]
    assert '--accelerator-type=v4-32' in create and '--spot' in create
    install, train = calls[2], calls[3]
    assert '--worker=all' in install and '--worker=all' in train
    command = next(a for a in train if a.startswith('--command='))[len('--command='):]
    words = shlex.split(command)
    assert words[:6] == ['cd', '~/psd_jax', '&&', 'python3', '-m', 'psd_jax.main']
    assert words[6:] == ['--workdir=gs://bucket/run 1', *TRAIN]  # every override intact
    assert calls[4][4] == 'psd-test' and '--quiet' in calls[4]


def test_tpu_pod_runs_the_sequence_with_quoted_overrides(tmp_path):
    result, calls = pod(tmp_path)
    assert result.returncode == 0, result.stderr
    check_sequence(calls)


def test_tpu_pod_dry_run_prints_the_same_commands_and_runs_none(tmp_path):
    result, calls = pod(tmp_path, '--dry-run')
    assert result.returncode == 0, result.stderr
    assert calls == []
    printed = [shlex.split(line)[1:] for line in result.stdout.splitlines()
               if line.startswith('gcloud ')]
    check_sequence(printed)


def test_tpu_pod_names_missing_options_and_gcloud(tmp_path):
    missing = subprocess.run(['bash', str(POD), '--name', 'x', '--', *TRAIN],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and '--zone is required' in missing.stderr
    args = ['--name', 'x', '--zone', 'z', '--accelerator', 'v4-8', '--workdir', 'gs://b', '--',
            *TRAIN]
    bare = tmp_path / 'bare'  # a PATH with the script's tools but no gcloud
    bare.mkdir()
    for tool in ('dirname',):
        (bare / tool).symlink_to(shutil.which(tool))
    no_gcloud = subprocess.run([shutil.which('bash'), str(POD), *args],
                               env=dict(os.environ, PATH=str(bare)), capture_output=True,
                               text=True)
    assert no_gcloud.returncode == 1 and 'gcloud not found' in no_gcloud.stderr
    signed_out = tmp_path / 'signed_out'
    signed_out.mkdir()
    (signed_out / 'gcloud').write_text('#!/bin/sh\nexit 0\n')  # lists no active account
    (signed_out / 'gcloud').chmod(0o755)
    no_auth = subprocess.run(['bash', str(POD), *args],
                             env=dict(os.environ, PATH=f'{signed_out}:{os.environ["PATH"]}'),
                             capture_output=True, text=True)
    assert no_auth.returncode == 1 and 'not authenticated' in no_auth.stderr


def test_local_multihost_runs_the_named_interpreter(tmp_path):
    """launch/local_multihost.sh starts $PSD_JAX_PYTHON, not whatever `python` PATH finds (a
    suite run as venv/bin/python -m pytest must launch the venv's interpreter)."""
    log = tmp_path / 'calls'
    fake = tmp_path / 'my-python'
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PSD_JAX_PYTHON=str(fake), COORDINATOR_PORT='12345',
               PATH='/usr/bin:/bin')  # no python of the project's on this PATH
    done = subprocess.run(['bash', str(ROOT / 'launch' / 'local_multihost.sh'), '-n', '2',
                           '-d', '1', '--', f'--workdir={tmp_path / "w"}', '--config=x.py'],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all(c.startswith('-m psd_jax.main --workdir=') for c in calls)
    assert {c.split('--process_id=')[1] for c in calls} == {'0', '1'}
