"""The prepared accelerator check: what the CPU cannot measure, in one command and one JSON.

    benchmarks/gpu_check.sh              # on the GPU machine: installs, then runs this
    python benchmarks/gpu_check.py [--budget_s 540] [--out gpu_check.json] [--dry_run]

Stages, in order, each skipped once the budget is spent (the JSON says which ran):
  step_time   ViT-B/32 and ViT-B/16 in bfloat16 at several batches, attention 'xla' vs
              'cudnn': median step time, images/s, MFU (model FLOPs, psd_jax/training/flops.py) and
              HFU (XLA's count) against the device's peak (psd_jax/training/mfu.py).
  loss_memory peak device memory (the allocator's peak_bytes_in_use) of a PSD step with the
              ring loss vs the all_gather loss at the same batch.
  vs_open_clip open_clip's train step on the same GPU (benchmarks/vs_open_clip.py), when
              open_clip is importable.
  demo        configs/demo.py end to end (python -m psd_jax.main), its wall time and metrics.
  protocol    the selection protocol's noisiest emoji_styles condition (40% shuffled
              captions) with a ViT-S/16 tower at 64 px: CLIP vs the PSD default, 3 seeds.

`--dry_run` runs every stage at tiny sizes on whatever devices there are (CPU included): the
test suite runs it so that the check works when a machine is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
FULL = {'models': [('ViT-B/32', [256, 512, 1024]), ('ViT-B/16', [128, 256, 512])],
        'attention': ['xla', 'cudnn'], 'dtype': 'bfloat16', 'image_size': 224,
        'context': 77, 'steps': 10, 'repeats': 3, 'loss_batch': 2048,
        'protocol': {'preset': 'ViT-S/16', 'image_size': 64, 'steps': 300, 'seeds': [0, 1, 2]},
        'demo_steps': 0}
DRY = {'models': [('tiny', [16])], 'attention': ['xla'], 'dtype': 'float32',
       'image_size': 32, 'context': 16, 'steps': 2, 'repeats': 2, 'loss_batch': 16,
       'protocol': {'preset': 'tiny', 'image_size': 32, 'steps': 2, 'seeds': [0]},
       'demo_steps': 2}


class Budget:
    """Seconds left of the check's wall-clock budget."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def make_config(preset: str, batch: int, sizes: dict, **overrides):
    from psd_jax import config as config_lib
    config = config_lib.base_config()
    config.model.preset = preset
    config.model.dtype = sizes['dtype']
    config.model.image_size = sizes['image_size']
    config.model.context_length = sizes['context']
    config.data.global_batch = batch
    for key, value in overrides.items():
        section, field = key.split('.', 1)
        config[section][field] = value
    config_lib.validate(config)
    return config


def time_step(config, steps: int, repeats: int) -> dict:
    """Compile the train step for a synthetic device batch, warm up, and time it."""
    import jax
    import numpy as np

    from psd_jax import config as config_lib, sharding
    from psd_jax.training import batch as batch_lib, flops, mfu, step
    mesh = sharding.make_mesh(config.mesh.to_dict())
    setup = config_lib.step_setup(config, mesh)
    shardings = step.state_shardings(setup, config.param_sharding)
    spec = step.batch_spec(setup, config.data.global_batch)
    batch = jax.device_put(batch_lib.synthetic(spec, np.random.default_rng(0),
                                               config.model.vocab_size),
                           sharding.batch_sharding(mesh))
    compiled = step.compile_train_step(setup, shardings, spec)
    state = step.init_state(setup, jax.random.key(0), config.param_sharding)
    from timing import time_blocks
    _, times, _ = time_blocks(compiled, state, batch, 2, steps, repeats)
    per_step = statistics.median(times)
    device = mesh.devices.flat[0]
    peak, source = mfu.peak_flops(0.0, device, config.model.dtype)
    model = flops.from_config(config).total / mesh.size
    hardware = mfu.step_flops(compiled)
    stats = device.memory_stats() or {}
    return {'ms_per_step': 1e3 * per_step, 'runs_ms': [1e3 * t for t in times],
            'images_per_s': config.data.global_batch / per_step,
            'mfu': mfu.mfu(model, per_step, peak), 'hfu': mfu.mfu(hardware, per_step, peak),
            'peak_flops': peak, 'peak_source': source,
            'model_tflop_per_device': model / 1e12, 'xla_tflop_per_device': hardware / 1e12,
            'peak_bytes_in_use': stats.get('peak_bytes_in_use'),
            'device_kind': device.device_kind}


def in_subprocess(code: str, timeout: float) -> dict:
    """Run `code` (which prints one JSON line last) in a fresh Python: a fresh allocator, so
    peak memory is the program's own."""
    done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=max(timeout, 1))
    if done.returncode:
        return {'error': done.stderr.strip().splitlines()[-1][:500] if done.stderr else
                f'exit {done.returncode}'}
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_step_time(sizes: dict, budget: Budget, dry: bool) -> list[dict]:
    rows = []
    for preset, batches in sizes['models']:
        for attention in sizes['attention']:
            for batch in batches:
                if budget.left() < 30:
                    return rows
                code = (f'import json, sys; sys.path.insert(0, {str(ROOT / "benchmarks")!r}); '
                        'import gpu_check as g; '
                        f'c = g.make_config({preset!r}, {batch}, g.{"DRY" if dry else "FULL"}, '
                        f'**{{"model.attention": {attention!r}}}); '
                        f'print(json.dumps(g.time_step(c, {sizes["steps"]}, '
                        f'{sizes["repeats"]})))')
                row = {'model': preset, 'batch': batch, 'attention': attention,
                       **in_subprocess(code, budget.left())}
                print('step_time', json.dumps(row), flush=True)
                rows.append(row)
    return rows


def stage_loss_memory(sizes: dict, budget: Budget, dry: bool) -> list[dict]:
    rows = []
    preset = sizes['models'][0][0]
    for impl in ('all_gather', 'ring'):
        if budget.left() < 30:
            break
        code = (f'import json, sys; sys.path.insert(0, {str(ROOT / "benchmarks")!r}); '
                'import gpu_check as g; '
                f'c = g.make_config({preset!r}, {sizes["loss_batch"]}, '
                f'g.{"DRY" if dry else "FULL"}, **{{"loss.kind": "psd", "loss.impl": {impl!r}}}); '
                f'print(json.dumps(g.time_step(c, 2, 1)))')
        row = {'model': preset, 'batch': sizes['loss_batch'], 'loss.impl': impl,
               **in_subprocess(code, budget.left())}
        print('loss_memory', json.dumps(row), flush=True)
        rows.append(row)
    return rows


def stage_vs_open_clip(budget: Budget, dry: bool, work: pathlib.Path) -> dict:
    import importlib.util
    if importlib.util.find_spec('open_clip') is None:
        return {'skipped': 'open_clip is not importable here'}
    out = work / 'vs_open_clip.json'
    case = ['--cases', 'small'] if dry else ['--cases', 'vitb16', '--batch', '256']
    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'vs_open_clip.py'), *case,
                           '--rounds', '1', '--venv', sys.prefix, '--out', str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=max(budget.left(), 1))
    if done.returncode:
        return {'error': done.stderr[-500:]}
    return json.loads(out.read_text())


def run_main(args: list[str], timeout: float) -> tuple[int, float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, '-m', 'psd_jax.main', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=max(timeout, 1))
    return done.returncode, time.perf_counter() - start, done.stderr[-500:]


def stage_demo(sizes: dict, budget: Budget, work: pathlib.Path) -> dict:
    workdir = work / 'demo'
    extra = [f'--config.train.steps={sizes["demo_steps"]}', '--config.optim.warmup_steps=1',
             '--config.eval.suite='] if sizes['demo_steps'] else []
    code, seconds, tail = run_main([f'--config={ROOT / "configs" / "demo.py"}',
                                    f'--workdir={workdir}', *extra], budget.left())
    row = {'exit': code, 'wall_s': seconds}
    final = workdir / 'final_metrics.json'
    if final.exists():
        row['final_metrics'] = json.loads(final.read_text())
    elif code:
        row['error'] = tail
    return row


def stage_protocol(sizes: dict, budget: Budget, work: pathlib.Path) -> list[dict]:
    """CLIP vs the PSD default on emoji_styles with 40% shuffled captions."""
    p = sizes['protocol']
    rows = []
    for seed in p['seeds']:
        for kind in ('clip', 'psd'):
            if budget.left() < 60:
                return rows
            workdir = work / f'protocol_{kind}_{seed}'
            code, seconds, tail = run_main([
                f'--config={ROOT / "configs" / "experiments" / "psd_vs_clip.py"}:emoji_styles',
                f'--workdir={workdir}', f'--config.loss.kind={kind}',
                f'--config.model.preset={p["preset"]}',
                f'--config.model.image_size={p["image_size"]}',
                f'--config.train.steps={p["steps"]}', f'--config.seed={seed}',
                '--config.data.caption_noise=0.4', '--config.data.caption_noise_kind=shuffle',
                *([] if p['steps'] >= 100 else ['--config.optim.warmup_steps=1'])],
                budget.left())
            row = {'loss': kind, 'seed': seed, 'exit': code, 'wall_s': seconds}
            final = workdir / 'final_metrics.json'
            if final.exists():
                row['final_metrics'] = json.loads(final.read_text())
            else:
                row['error'] = tail
            print('protocol', json.dumps({k: v for k, v in row.items()
                                          if k != 'final_metrics'}), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--budget_s', type=float, default=540)
    parser.add_argument('--out', default='gpu_check.json')
    parser.add_argument('--work', default='/tmp/psd_jax_gpu_check')
    parser.add_argument('--dry_run', action='store_true')
    parser.add_argument('--stages', nargs='+', default=['step_time', 'loss_memory',
                                                        'vs_open_clip', 'demo', 'protocol'])
    args = parser.parse_args()
    budget, sizes = Budget(args.budget_s), DRY if args.dry_run else FULL
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import jax
    result = {'command': 'python benchmarks/gpu_check.py ' + ' '.join(sys.argv[1:]),
              'date': time.strftime('%Y-%m-%d %H:%M'), 'jax': jax.__version__,
              'devices': [d.device_kind for d in jax.devices()], 'dry_run': args.dry_run,
              'commit': os.environ.get('PSD_JAX_COMMIT', ''), 'stages': {}}
    out = pathlib.Path(args.out)

    def save():
        out.write_text(json.dumps(result, indent=1))

    runners = {'step_time': lambda: stage_step_time(sizes, budget, args.dry_run),
               'loss_memory': lambda: stage_loss_memory(sizes, budget, args.dry_run),
               'vs_open_clip': lambda: stage_vs_open_clip(budget, args.dry_run, work),
               'demo': lambda: stage_demo(sizes, budget, work),
               'protocol': lambda: stage_protocol(sizes, budget, work)}
    for name in args.stages:
        if budget.left() < 30:
            result['stages'][name] = {'skipped': 'budget spent'}
            continue
        start = time.perf_counter()
        try:
            result['stages'][name] = runners[name]()
        except subprocess.TimeoutExpired:
            result['stages'][name] = {'skipped': 'budget spent during the stage'}
        print(f'{name}: {time.perf_counter() - start:.0f} s', flush=True)
        save()
    save()
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
