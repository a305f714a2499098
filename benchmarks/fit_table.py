"""What fits on a TPU slice: each paper config's train step compiled ahead of time for the
topology its docstring names (psd_jax.compile_check; needs libtpu: pip install -e '.[aot]'),
at its own global batch, and the largest global batch that fits with each memory lever:
remat none, remat full, GradCache accumulation over --micro_batches micro-batches (with the
ring loss, so the loss holds no b x B slab), and accumulation with remat full. Also the
compile time of a config with and without scanned layers.

    python benchmarks/fit_table.py [--configs psd_cc12m_vitb16 ...] [--precision 0.1]
        [--scan_layers] [--start_batch N] [--compile_time psd_cc12m_vitb16]
        [--out benchmarks/results/fit.json]

Prints one line per compiled candidate and a table at the end; the JSON is rewritten after
every row, so an interrupted run keeps what it measured. Bisection stops once the bracket is
within --precision of its lower end: the largest batch reported fits, and the next candidate
tried above it did not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = {'psd_cc12m_vitb16': 'v4-128', 'psd_yfcc15m_rn50': 'v4-128',
            'psd_cc3m_vitb32': 'v4-32', 'clip_cc3m_vitb32': 'v4-32'}
LEVERS = {'remat none': {},
          'remat full': {'model.remat': 'full'},
          'accumulation': {'train.micro_batches': None, 'loss.impl': 'ring'},
          'accumulation, remat full': {'train.micro_batches': None, 'loss.impl': 'ring',
                                       'model.remat': 'full'}}


def load(name: str, overrides: dict):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        section, field = key.split('.')
        config[section][field] = value
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--configs', nargs='*', default=list(TOPOLOGY), choices=list(TOPOLOGY))
    parser.add_argument('--levers', nargs='+', default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument('--micro_batches', type=int, default=8)
    parser.add_argument('--precision', type=float, default=0.1)
    parser.add_argument('--start_batch', type=int, default=0,
                        help='where the search for the largest batch starts (default: the '
                        'config\'s own batch), e.g. to resume an interrupted search')
    parser.add_argument('--own_only', action='store_true',
                        help='only the config\'s own batch: no search for the largest')
    parser.add_argument('--scan_layers', action='store_true',
                        help='compile with model.scan_layers (faster compiles)')
    parser.add_argument('--compile_time', nargs='*', default=[], choices=list(TOPOLOGY),
                        help='configs whose compile time is measured with and without scan')
    parser.add_argument('--compile_remat', default='full', help='model.remat for those')
    parser.add_argument('--per_core', action='store_true',
                        help='v4 / v5p: a device per TensorCore instead of the megacore device '
                        'per chip that JAX presents')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'fit.json'))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from psd_jax import provenance
    result = {**provenance.record('python benchmarks/fit_table.py'),
              'devices': 'per TensorCore' if args.per_core else 'per chip (megacore on v4)',
              'precision': args.precision, 'scan_layers': args.scan_layers, 'fit': [],
              'compile_time': []}

    def save():
        out.write_text(json.dumps(result, indent=1))

    for name in args.compile_time:
        compile_times(name, args, result, save)
    for name in args.configs:
        fit_rows(name, args, result, save)
    print_table(result)
    print(f'wrote {out}')


def compile_times(name: str, args, result: dict, save) -> None:
    """Compile time and memory of `name` with and without scanned layers."""
    from psd_jax import compile_check
    devices, label, _ = compile_check.devices_for(TOPOLOGY[name], 0, args.per_core)
    for scan in (False, True):
        config = load(name, {'model.scan_layers': scan, 'model.remat': args.compile_remat})
        numbers = compile_check.compile_for(config, devices, config.data.global_batch, 0)
        row = {'config': name, 'topology': label, 'scan_layers': scan,
               'remat': args.compile_remat, **numbers}
        size = (f'{numbers["total_gib"]:.2f} GiB/device' if 'total_gib' in numbers
                else numbers.get('error', ''))
        print(f'{name} on {label}, scan_layers={scan}, remat {args.compile_remat}: '
              f'compiled in {numbers["compile_s"]:.1f} s, {size}', flush=True)
        result['compile_time'].append(row)
        save()


def fit_rows(name: str, args, result: dict, save) -> None:
    """`name` at its own batch, and its largest batch, with each lever."""
    from psd_jax import compile_check
    devices, label, hbm = compile_check.devices_for(TOPOLOGY[name], 0, args.per_core)
    for lever in args.levers:
        overrides = {k: (args.micro_batches if v is None else v)
                     for k, v in LEVERS[lever].items()}
        overrides['model.scan_layers'] = args.scan_layers
        config = load(name, overrides)
        if config.model.preset == 'RN50' and lever.startswith('accumulation'):
            row = {'config': name, 'lever': lever, 'skipped': 'BatchNorm: accumulation '
                   'would change the statistics (refused by the step)'}
            result['fit'].append(row)
            save()
            continue
        print(f'{name} on {label}, {lever}:', flush=True)
        start = time.perf_counter()
        own = compile_check.compile_for(config, devices, config.data.global_batch, 0)
        tries = []  # every candidate of the search: its size, or the compiler's refusal
        best = None if args.own_only else compile_check.largest_batch(
            config, devices, hbm, 0, args.start_batch or config.data.global_batch,
            args.precision, on_try=lambda numbers: tries.append(
                {k: numbers.get(k) for k in ('global_batch', 'total_gib', 'temp_gib',
                                             'compile_s', 'error')}))
        row = {'config': name, 'topology': label, 'hbm_gib': hbm, 'lever': lever,
               'overrides': overrides, 'own_batch': config.data.global_batch,
               'own_total_gib': own.get('total_gib'), 'own_fits': own['fits'] is not False
               and own['total_gib'] <= hbm, 'own_model_tflop_per_device':
               own.get('model_flops_per_device', 0) / 1e12, 'own_xla_tflop_per_device':
               own.get('flops_per_device', 0) / 1e12, 'own_compile_s': own['compile_s'],
               'process_peak_host_gib_so_far': compile_check.peak_host_gib(),
               'largest_batch': best, 'tries': tries,
               'seconds': time.perf_counter() - start}
        print(f'  -> largest global batch {best}', flush=True)
        result['fit'].append(row)
        save()


def print_table(result: dict) -> None:
    header = (f'{"config":>18} {"topology":>22} {"lever":>24} {"own batch":>9} '
              f'{"GiB/device":>10} {"fits":>5} {"largest batch":>13}')
    print(header)
    print('-' * len(header))
    for row in result['fit']:
        if 'skipped' in row:
            print(f'{row["config"]:>18} {"":>22} {row["lever"]:>24} skipped: {row["skipped"]}')
            continue
        gib = '-' if row['own_total_gib'] is None else f'{row["own_total_gib"]:.2f}'
        print(f'{row["config"]:>18} {row["topology"]:>22} {row["lever"]:>24} '
              f'{row["own_batch"]:>9} {gib:>10} {str(row["own_fits"]):>5} '
              f'{str(row["largest_batch"] or "-"):>13}')
    for row in result['compile_time']:
        size = f'{row["total_gib"]:.2f} GiB/device' if 'total_gib' in row else row['error']
        print(f'{row["config"]} scan_layers={row["scan_layers"]} remat {row["remat"]}: '
              f'compile {row["compile_s"]:.1f} s, {size}')


if __name__ == '__main__':
    main()
