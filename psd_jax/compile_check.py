"""Does a config's train step fit? Compile it ahead of time for a TPU topology, on any machine.

    python -m psd_jax.compile_check --config configs/psd_cc12m_vitb16.py --topology v4-128 \
        [--max_batch] [--config.key=value ...]

With `libtpu` installed (`pip install -e '.[aot]'`), `jax.experimental.topologies` describes
the TPU slice (`v4-128`, `v5p-128`, `v5e-256`, `v6e-256`, or `v4:4x4x4`-style names) as JAX
presents it on the real slice (v4 / v5p: one megacore device per chip, with the chip's HBM;
`--per_core` for a device per TensorCore), and the real train step (model, loss, optimizer,
shardings from the config) is compiled for it, without a TPU. Prints per-device memory
(arguments, outputs, temporaries) against the device's HBM, model and XLA FLOPs per device,
the compile time and the peak host memory; exits 1 when the step does not fit.
`--max_batch` bisects for the largest global batch that fits. Without `--topology`, the
machine's own devices stand in (`--cpu_devices N` CPU devices: labelled as such; they have no
HBM limit, so only the numbers are reported).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('topology', None, 'TPU slice: v4-128, v5p-128, v5e-256, v6e-256, or a '
                    'topology name such as v4:4x4x4 (needs libtpu); unset: local devices.')
flags.DEFINE_integer('cpu_devices', 8, 'Local devices to use without --topology.')
flags.DEFINE_bool('max_batch', False, 'Also find the largest global batch that fits.')
flags.DEFINE_float('hbm_gib', 0.0, 'Memory per device to check against (0: the chip\'s).')
flags.DEFINE_bool('per_core', False, 'v4 / v5p: one device per TensorCore (libtpu\'s '
                  '"default" chip config) instead of the one megacore device per chip that '
                  'JAX presents on these chips.')
flags.DEFINE_string('out', '', 'Also write the numbers as JSON to this file (with the '
                    'command and the commit).')
flags.DEFINE_integer('dataset_size', 0, 'Training pairs (sizes the bank teacher\'s state).')
flags.mark_flags_as_required(['config'])

# What JAX presents on each TPU generation: v4 and v5p chips hold two TensorCores that JAX
# drives as one "megacore" device with the chip's whole HBM; v5e and v6e chips have one core.
# Accelerator-type names count TensorCores for v4 / v5p (v4-128: 64 chips) and chips otherwise.
CHIPS = {  # kind: (cores per chip, HBM GiB per chip, megacore)
    'v4': (2, 32, True), 'v5p': (2, 95, True), 'v5e': (1, 16, False), 'v6e': (1, 32, False)}
DEVICE_KINDS = {'TPU v4': 'v4', 'TPU v5': 'v5p', 'TPU v5 lite': 'v5e', 'TPU v6 lite': 'v6e'}
SHAPES_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
             256: '4x8x8', 512: '8x8x8'}
SHAPES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
             256: '16x16'}


def topology_name(name: str) -> str:
    """'v4-128' -> 'v4:4x4x4' (v4 / v5p counts are TensorCores, two per chip); names with a
    ':' pass through. ValueError naming the allowed values otherwise."""
    if ':' in name:
        return name
    kind, _, count = name.partition('-')
    if kind not in CHIPS or not count.isdigit():
        raise ValueError(f'--topology={name!r} is not known; use <type>-<cores> with type one '
                         f'of {sorted(CHIPS)} (e.g. v4-128, v5e-256) or a topology '
                         'name such as v4:4x4x4')
    cores = CHIPS[kind][0]
    chips = int(count) // cores
    shapes = SHAPES_3D if kind in ('v4', 'v5p') else SHAPES_2D
    if chips not in shapes:
        raise ValueError(f'--topology={name!r}: {chips} chips is not a standard {kind} slice; '
                         f'allowed core counts: {[c * cores for c in sorted(shapes)]}')
    return f'{kind}:{shapes[chips]}'


def slice_layout(name: str, per_core: bool = False) -> dict:
    """What a user's JAX sees on the slice `name`: {'topology', 'chip_config', 'chips',
    'devices', 'hbm_gib' (per device)}. v4 / v5p: one megacore device per chip with the chip's
    HBM; `per_core`: libtpu's other layout, a device per TensorCore with half of it."""
    full = topology_name(name)
    kind, shape = full.split(':')
    if kind not in CHIPS:
        raise ValueError(f'--topology={name!r}: TPU kind {kind!r} is not known; allowed: '
                         f'{sorted(CHIPS)}')
    cores, hbm, megacore = CHIPS[kind]
    chips = math.prod(int(x) for x in shape.split('x'))
    split = per_core and megacore
    return {'topology': full, 'chip_config': 'default' if split or not megacore else 'megacore',
            'chips': chips, 'devices': chips * (cores if split else 1),
            'hbm_gib': hbm / cores if split else float(hbm)}


def peak_host_gib() -> float:
    """The peak resident memory of this process so far (the compile's host RAM), GiB."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


@contextlib.contextmanager
def _stderr_into(held):
    """libtpu, loaded off a TPU host, writes warnings about the host it cannot find (accelerator
    type, worker hostnames) to file descriptor 2: send them to `held`, a file the caller shows
    only when loading fails, where they may explain why."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(held.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def devices_for(topology: str | None, cpu_devices: int, per_core: bool = False
                ) -> tuple[list, str, float | None]:
    """(devices, a label, HBM GiB per device or None): the slice as slice_layout describes
    it, or the machine's own devices without a topology."""
    import jax
    if topology is None:
        devices = jax.devices()[:cpu_devices]
        return devices, f'{len(devices)} x {devices[0].device_kind} (stand-in: no TPU)', None
    layout = slice_layout(topology, per_core)
    held = tempfile.TemporaryFile(mode='w+')
    try:
        from jax.experimental import topologies
        with _stderr_into(held):
            desc = topologies.get_topology_desc(platform='tpu',
                                                topology_name=layout['topology'],
                                                chip_config_name=layout['chip_config'])
    except (ImportError, RuntimeError) as e:
        held.seek(0)
        sys.stderr.write(held.read())
        raise ValueError(f'--topology={topology!r} needs libtpu (pip install -e \'.[aot]\'): '
                         f'{str(e).splitlines()[0][:200]}') from e
    devices = list(desc.devices)
    if len(devices) != layout['devices']:
        raise ValueError(f'--topology={topology!r}: libtpu gave {len(devices)} devices where '
                         f'{layout["devices"]} were expected ({layout["chip_config"]} chips)')
    what = 'per TensorCore' if layout['chip_config'] == 'default' and per_core else 'per chip'
    return (devices, f'{topology} ({len(devices)} x {devices[0].device_kind}, one device '
            f'{what})', layout['hbm_gib'])


def compile_for(config, devices, global_batch: int, dataset_size: int) -> dict:
    """Compile the config's train step at `global_batch` on `devices`; its numbers."""
    from psd_jax import config as config_lib, sharding
    from psd_jax.training import flops, mfu, step
    config = config.copy_and_resolve_references()
    config.data.global_batch = global_batch
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    setup = config_lib.step_setup(config, mesh, dataset_size=dataset_size)
    shardings = step.state_shardings(setup, config.param_sharding)
    start = time.perf_counter()
    try:
        compiled = step.compile_train_step(setup, shardings,
                                           step.batch_spec(setup, global_batch))
    except Exception as e:  # the TPU compiler refuses a program that exceeds HBM
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        return {'global_batch': global_batch, 'mesh': dict(mesh.shape), 'fits': False,
                'compile_s': time.perf_counter() - start,
                'error': str(e).splitlines()[0][:300]}
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    gib = 2 ** 30
    out = {'global_batch': global_batch, 'mesh': dict(mesh.shape), 'compile_s': seconds,
           'flops_per_device': mfu.step_flops(compiled),
           'model_flops_per_device': flops.from_config(config).total / len(devices),
           'peak_host_gib': peak_host_gib()}
    for key in ('argument', 'output', 'temp', 'alias'):
        out[f'{key}_gib'] = getattr(memory, f'{key}_size_in_bytes', 0) / gib
    out['total_gib'] = out['argument_gib'] + out['output_gib'] + out['temp_gib'] - out[
        'alias_gib']
    out['flops_per_step'] = out['flops_per_device'] * len(devices)
    out['fits'] = None  # decided against the HBM by the caller
    return out


def largest_batch(config, devices, hbm: float, dataset_size: int, start: int,
                  precision: float = 0.0, on_try: Callable[[dict], None] | None = None) -> int:
    """Bisection over multiples of the data shards (times train.micro_batches, which must
    divide each shard's rows): the largest global batch whose step fits in `hbm` GiB per
    device. `precision` > 0 stops once the bracket is within that fraction of the lower end
    (fewer compiles; the answer is then a lower bound that fits). `on_try(numbers)` sees each
    compiled candidate."""
    from psd_jax import sharding
    unit = sharding.data_size(sharding.make_mesh(config.mesh.to_dict(), devices)) * max(
        1, config.train.micro_batches)

    def fits(units: int) -> bool:
        numbers = compile_for(config, devices, units * unit, dataset_size)
        said = numbers.get('error') or '%.2f GiB/device' % numbers['total_gib']
        print(f'  global batch {units * unit}: {said} ({numbers["compile_s"]:.0f} s)',
              flush=True)
        if on_try:
            on_try(numbers)
        return numbers['fits'] is not False and numbers['total_gib'] <= hbm

    low, high = 0, max(1, start // unit)
    while fits(high) and high < 2 ** 24:
        low, high = high, high * 2
    while high - low > max(1, int(precision * low)):
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * unit


def report(label: str, numbers: dict, hbm: float | None, scanned: bool = False) -> bool:
    """Print the table; returns whether the step fits."""
    print(f'train step on {label}, global batch {numbers["global_batch"]}, mesh '
          f'{numbers["mesh"]}, compiled in {numbers["compile_s"]:.1f} s')
    if numbers['fits'] is False:
        print(f'  DOES NOT FIT: {numbers["error"]}')
        return False
    for key in ('argument', 'output', 'temp', 'alias', 'total'):
        print(f'  {key + " GiB/device":>22}: {numbers[key + "_gib"]:.3f}')
    print(f'  {"model TFLOP/device":>22}: {numbers["model_flops_per_device"] / 1e12:.3f} '
          '(the architecture\'s, what MFU counts)')
    print(f'  {"XLA TFLOP/device":>22}: {numbers["flops_per_device"] / 1e12:.3f} '
          f'({numbers["flops_per_step"] / 1e12:.3f} per step; remat recomputation included)'
          + (' (undercounted: XLA counts a scanned loop\'s body once)' if scanned else ''))
    print(f'  {"peak host GiB":>22}: {numbers["peak_host_gib"]:.1f} (this process, compile '
          'included)')
    if hbm is None:
        print('  no HBM limit for these devices: nothing to fit against')
        return True
    fits = numbers['total_gib'] <= hbm
    print(f'  {"HBM GiB/device":>22}: {hbm:.1f} -> {"fits" if fits else "DOES NOT FIT"}')
    return fits


def write_json(path: str, label: str, hbm: float | None, numbers: dict, fits: bool) -> None:
    """The numbers, what they were measured on, the command line and the code's commit."""
    import json

    from psd_jax import provenance
    record = {**provenance.record('python -m psd_jax.compile_check'), 'devices': label,
              'hbm_gib_per_device': hbm, 'fits': fits, **numbers}
    with open(path, 'w') as f:
        json.dump(record, f, indent=1)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    from psd_jax import config as config_lib
    from psd_jax.cli import quiet_libraries
    quiet_libraries()  # e.g. JAX's INFO line that no TPU backend could be started here
    try:
        config_lib.validate(FLAGS.config)
        devices, label, hbm = devices_for(FLAGS.topology, FLAGS.cpu_devices, FLAGS.per_core)
        hbm = FLAGS.hbm_gib or hbm
        numbers = compile_for(FLAGS.config, devices, FLAGS.config.data.global_batch,
                              FLAGS.dataset_size)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    fits = report(label, numbers, hbm, FLAGS.config.model.scan_layers)
    if FLAGS.out:
        write_json(FLAGS.out, label, hbm, numbers, fits)
    if FLAGS.max_batch and hbm is not None:
        best = largest_batch(FLAGS.config, devices, hbm, FLAGS.dataset_size,
                             FLAGS.config.data.global_batch)
        print(f'  largest global batch that fits: {best}')
    sys.exit(0 if fits else 1)


if __name__ == '__main__':
    from psd_jax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
