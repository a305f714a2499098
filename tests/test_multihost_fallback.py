"""The checkpoint fallback on 2 processes (jax.distributed on 127.0.0.1, gloo): hosts that
see different things still agree. Damage seen by one host only: both restore checkpoint 1 and
checkpoint 2 is set aside once. A read that times out once on one host: retried, both restore
checkpoint 2, nothing set aside. One that keeps timing out: both stop with
CheckpointUnavailable, nothing set aside, no hang. A file damaged for every host: both fall
back to 1. A checkpoint one host does not list (storage listed late there): both restore the
previous one and nothing is set aside. (tests/checkpoint_fallback_worker.py is each process.)"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

from conftest import with_compile_cache

WORKER = pathlib.Path(__file__).resolve().parent / 'checkpoint_fallback_worker.py'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_hosts_agree_on_the_checkpoint_to_restore(tmp_path):
    env = with_compile_cache(dict(os.environ, JAX_PLATFORMS='cpu',
                                  XLA_FLAGS='--xla_force_host_platform_device_count=1 '
                                            '--xla_backend_optimization_level=0'))
    port = str(free_port())
    logs = [(tmp_path / f'out{i}', tmp_path / f'err{i}') for i in (0, 1)]
    procs = []  # output to files: a full pipe would stall one host while the other waits
    for i, (out, err) in enumerate(logs):
        with open(out, 'w') as o, open(err, 'w') as e:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), port, str(i),
                                           str(tmp_path / 'runs')], env=env, stdout=o, stderr=e))
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            p.kill()
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    rows = {}
    for out, _ in outputs:
        for line in out.splitlines():
            if line.startswith('{'):
                row = json.loads(line)
                rows[row['scenario'], row['process']] = row
    assert len(rows) == 10, rows
    for host in (0, 1):
        one = rows['damage_seen_by_one_host', host]
        assert one['step'] == 1 and one['state_step'] == 1 and one['config'] == {'n': 1}
        assert len(one['aside']) == 1 and one['aside'][0].startswith('2-'), one
        once = rows['transient_once', host]
        assert once['step'] == 2 and once['aside'] == [], once
        always = rows['transient_always', host]
        assert 'CheckpointUnavailable' in always.get('error', ''), always
        assert 'host(s) [1]' in always['error'] and 'nothing was set aside' in always['error']
        assert always['aside'] == []
        everyone = rows['file_damaged_for_all', host]
        assert everyone['step'] == 1 and len(everyone['aside']) == 1, everyone
        late = rows['listing_differs', host]  # skipped, not set aside: it is not damaged
        assert late['step'] == 1 and late['aside'] == [], late
    assert rows['transient_once', 1]['reads_on_this_host'] == 2  # failed once, retried
    assert rows['transient_always', 1]['reads_on_this_host'] == 3  # READ_TRIES
    assert 'retrying' in outputs[1][1]  # the retry is logged on the host that failed
