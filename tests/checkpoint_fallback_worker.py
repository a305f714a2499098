"""One process of tests/test_multihost_fallback.py: joins a 2-process JAX job on 127.0.0.1,
saves checkpoints 1 and 2 of a tiny train state with the other process, then, for each
scenario, fails some reads on this host only (or damages a file for every host) and restores
with Checkpointer.restore_newest_readable. Prints one JSON line per scenario:
{'scenario', 'process', 'step' | 'error', 'aside': [names in damaged_checkpoints/]}.

    python tests/checkpoint_fallback_worker.py PORT PROCESS_ID WORKDIR
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


SCENARIOS = ('damage_seen_by_one_host', 'transient_once', 'transient_always',
             'file_damaged_for_all', 'listing_differs')


def main(port: str, process_id: int, root: str) -> None:
    import jax
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
    import importlib.util

    from psd_jax import config as config_lib, sharding
    from psd_jax.persistence import fallback
    from psd_jax.training import step

    spec = importlib.util.spec_from_file_location('tiny_test', ROOT / 'configs' / 'tiny_test.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.global_batch = 4
    setup = config_lib.step_setup(config, sharding.make_mesh({'data': 2}, jax.devices()))
    state = step.init_state(setup, jax.random.key(0))
    fallback.READ_PAUSE_S = 0.05
    for scenario in SCENARIOS:
        print(json.dumps(run_scenario(scenario, pathlib.Path(root) / scenario, setup, state)),
              flush=True)
    jax.distributed.shutdown()


def run_scenario(scenario: str, workdir: pathlib.Path, setup, state) -> dict:
    """Save checkpoints 1 and 2 on both hosts, break what `scenario` says on this host (or
    on disk), restore, and report what this host restored and what was set aside."""
    import jax
    from jax.experimental import multihost_utils

    from psd_jax.persistence import checkpointing, fallback
    from psd_jax.training import step
    me = jax.process_index()
    ckpt = checkpointing.Checkpointer(workdir, asynchronous=False)
    for number in (1, 2):
        ckpt.save(number, state.replace(step=state.step + number), None, {'n': number})
    ckpt.wait()
    multihost_utils.sync_global_devices(f'{scenario} saved')
    reads = {'count': 0}
    original = ckpt._read_state

    def failing(abstract, iterator, number):
        if number == 2 and me == 1:
            reads['count'] += 1
            if scenario == 'damage_seen_by_one_host':
                raise ValueError('DATA_LOSS: a chunk of this host\'s shard does not decode')
            if scenario == 'transient_always' or (scenario == 'transient_once'
                                                  and reads['count'] == 1):
                raise TimeoutError('the storage timed out')
        return original(abstract, iterator, number)

    ckpt._read_state = failing
    if scenario == 'listing_differs' and me == 1:  # shared storage listed late here
        listed = ckpt.manager.all_steps
        ckpt.manager.all_steps = lambda: [n for n in listed() if n != 2]
    if scenario == 'file_damaged_for_all' and me == 0:
        manifest = next((workdir / 'checkpoints' / '2' / 'state').rglob('manifest.ocdbt'))
        manifest.write_bytes(b'\0' * manifest.stat().st_size)
    multihost_utils.sync_global_devices(f'{scenario} damaged')
    out = {'scenario': scenario, 'process': me}
    shardings = step.state_shardings(setup)
    try:
        restored, number, _, saved = ckpt.restore_newest_readable(
            lambda _: step.abstract_state(setup, shardings), lambda: None, lambda *_: None)
        out.update(step=number, state_step=int(jax.device_get(restored.step)), config=saved)
    except fallback.CheckpointUnavailable as e:
        out['error'] = f'CheckpointUnavailable: {e}'
    multihost_utils.sync_global_devices(f'{scenario} restored')
    aside = workdir / 'damaged_checkpoints'
    out['aside'] = sorted(p.name for p in aside.iterdir()) if aside.exists() else []
    out['reads_on_this_host'] = reads['count']
    ckpt.close()
    multihost_utils.sync_global_devices(f'{scenario} done')
    return out


if __name__ == '__main__':
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
