"""Train-step time of CLIP vs PSD (each teacher source) on one config, same batch, same mesh.

    python benchmarks/step_time.py [--config configs/demo.py] [--steps 30] [--repeats 5]
        [--variants clip 'psd ema' ...]

Times the compiled train step alone (a fixed device-resident batch; no input pipeline): per
variant, the median over --repeats runs of --steps steps each, after a warm-up. Variants are
timed in interleaved rounds so drifts in machine load hit them alike. Prints a table with the
ratio to CLIP and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import time

VARIANTS = {
    'clip': {'kind': 'clip'},
    'psd same_pass': {'kind': 'psd', 'teacher': 'same_pass'},
    'psd second_pass': {'kind': 'psd', 'teacher': 'second_pass'},
    'psd ema': {'kind': 'psd', 'teacher': 'ema'},
    'psd bank': {'kind': 'psd', 'teacher': 'bank'},
    'psd previous_step': {'kind': 'psd', 'teacher': 'previous_step'},
    'clip patch_dropout 0.5': {'kind': 'clip', 'patch_dropout': 0.5},
    'psd ema patch_dropout 0.5': {'kind': 'psd', 'teacher': 'ema', 'patch_dropout': 0.5},
}
BANK_SIZE = 2048  # pairs in the embedding bank (the emoji training set has 1,911)


def load_config(path: str):
    spec = importlib.util.spec_from_file_location('experiment_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def prepare(config_path: str, mesh, variant: dict) -> dict:
    """The compiled step, a state warmed up by two steps, and a device batch for one variant."""
    import jax
    import numpy as np

    from psd_jax import config as config_lib, sharding
    from psd_jax.training import batch as batch_lib, step

    config = load_config(config_path)
    config.loss.kind = variant['kind']
    if 'teacher' in variant:
        config.loss.psd.teacher = variant['teacher']
    config.model.patch_dropout = variant.get('patch_dropout', 0.0)
    config.loss.alpha_schedule = 'constant'  # distillation active at every timed step
    setup = config_lib.step_setup(config, mesh, dataset_size=BANK_SIZE)
    shardings = step.state_shardings(setup, config.param_sharding)
    spec = step.batch_spec(setup, config.data.global_batch)
    batch = batch_lib.synthetic(spec, np.random.default_rng(0), config.model.vocab_size,
                                dataset_size=BANK_SIZE)
    if setup.repeated_pairs:  # the batch repeats its own slots [k, 2k): the teacher is active
        k = setup.repeated_pairs
        batch['index'][:k] = batch['index'][k:2 * k]
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    fn = step.compile_train_step(setup, shardings, spec)
    state = step.init_state(setup, jax.random.key(0), config.param_sharding)
    for _ in range(2):  # the second step of a bank teacher distils from the first's bank
        state, m = fn(state, batch)
    jax.block_until_ready(m)
    return {'fn': fn, 'state': state, 'batch': batch, 'times': []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    root = pathlib.Path(__file__).resolve().parents[1]
    parser.add_argument('--config', default=str(root / 'configs' / 'demo.py'))
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS),
                        help='which to time (clip always, as the reference)')
    parser.add_argument('--out', default=str(root / 'benchmarks' / 'results' / 'step_time.json'))
    args = parser.parse_args()

    import jax

    from psd_jax import sharding

    base = load_config(args.config)
    mesh = sharding.make_mesh(base.mesh.to_dict())
    b, s = base.data.global_batch, base.model.image_size
    names = ['clip'] + [n for n in args.variants if n != 'clip']
    runs = {name: prepare(args.config, mesh, VARIANTS[name]) for name in names}
    for _ in range(args.repeats):
        for name, r in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                r['state'], m = r['fn'](r['state'], r['batch'])
            jax.block_until_ready(m)
            r['times'].append((time.perf_counter() - start) / args.steps)
    clip = statistics.median(runs['clip']['times'])
    print(f'{pathlib.Path(args.config).name}: batch {b}, {s} px, {sharding.describe(mesh)}; '
          f'median of {args.repeats} x {args.steps} steps')
    print(f'{"variant":>26} {"ms/step":>9} {"vs CLIP":>8}')
    rows = []
    for name, r in runs.items():
        t = statistics.median(r['times'])
        rows.append({'variant': name, 'ms_per_step': 1e3 * t, 'ratio_to_clip': t / clip,
                     'runs_ms': [1e3 * x for x in r['times']]})
        print(f'{name:>26} {1e3 * t:>9.1f} {t / clip:>8.3f}')
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from psd_jax import provenance
    out.write_text(json.dumps({**provenance.record('python benchmarks/step_time.py'),
                               'config': pathlib.Path(args.config).name, 'rows': rows},
                              indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
