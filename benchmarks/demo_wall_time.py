"""Wall time and final metrics of the demo (README's table), optionally against an older revision.

    python benchmarks/demo_wall_time.py [--runs 3] [--out benchmarks/results/demo_wall_time.json]
    git worktree add /tmp/psd_jax_base <revision>   # to compare with older code:
    python benchmarks/demo_wall_time.py --baseline /tmp/psd_jax_base [--baseline_cache DIR]

Runs `python -m psd_jax.main --config configs/demo.py` in a fresh workdir --runs times with this
tree's code (and, with --baseline, with the baseline tree's via PYTHONPATH, alternating); the
data are fetched
and prepared beforehand, so the times cover compiling, training and evaluating. The baseline
gets its own data cache (PSD_JAX_CACHE: a copy of this one's fetched sources and prepared emoji
dataset), so an older dataset version never overwrites the current one; --warmup adds one
untimed run of each first, for data not yet prepared. Prints the median wall
times, their ratio, and each run's final retrieval and zero-shot numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from psd_jax import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get('PSD_JAX_CACHE', pathlib.Path.home() / '.cache' / 'psd_jax'))
KEYS = tuple(f'eval/retrieval/{d}_{m}' for d in ('i2t', 't2i')
             for m in ('R@1', 'R@5', 'R@10', 'median_rank')) + (
    'eval/zero_shot/top1', 'eval/zero_shot/top5')


def run_demo(tree: pathlib.Path, cache: pathlib.Path) -> dict:
    """One demo run of the code in `tree`; its wall time and final metrics."""
    env = dict(os.environ, PYTHONPATH=str(tree), PSD_JAX_CACHE=str(cache))
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, '-m', 'psd_jax.main', '--config',
                               str(tree / 'configs' / 'demo.py'), '--workdir', workdir],
                              env=env, cwd=tree, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f'demo in {tree} failed:\n{done.stderr[-3000:]}')
        final = json.loads((pathlib.Path(workdir) / 'final_metrics.json').read_text())
    return {'seconds': seconds, 'metrics': {k: final[k] for k in KEYS if k in final}}


def prepare_baseline(tree: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
    """Checks the baseline checkout and gives it its own copy of the fetched data."""
    if not (tree / 'psd_jax').is_dir():
        raise SystemExit(f'--baseline {tree}: no psd_jax package there')
    cache.mkdir(parents=True, exist_ok=True)
    for name in ('emoji_sources', 'bpe_simple_vocab_16e6.txt.gz', 'tfds/emoji'):
        source, target = CACHE / name, cache / name
        if source.exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--baseline', type=pathlib.Path, default=None,
                        help='a checkout of an older revision to compare with (optional)')
    parser.add_argument('--baseline_cache', type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / 'psd_jax_base_cache')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--warmup', action='store_true',
                        help='one untimed run of each first (prepares data not yet prepared)')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'demo_wall_time.json'))
    args = parser.parse_args()
    trees = {'current': (ROOT, CACHE)}
    if args.baseline is not None:
        trees['baseline'] = (args.baseline, prepare_baseline(args.baseline, args.baseline_cache))
    for name, (tree, cache) in trees.items() if args.warmup else ():  # untimed
        print(f'warm-up run ({name})...', flush=True)
        run_demo(tree, cache)
    runs = {name: [] for name in trees}
    for r in range(args.runs):
        for name, (tree, cache) in trees.items():
            result = run_demo(tree, cache)
            runs[name].append(result)
            print(f'run {r + 1}/{args.runs} {name}: {result["seconds"]:.1f} s '
                  f'{result["metrics"]}', flush=True)
    median = {name: statistics.median(r['seconds'] for r in rs) for name, rs in runs.items()}
    print(f'\nmedian wall time: current {median["current"]:.1f} s' + (
        f', baseline {median["baseline"]:.1f} s; speed-up '
        f'{median["baseline"] / median["current"]:.2f}x' if 'baseline' in median else ''))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**provenance.record('python benchmarks/demo_wall_time.py'),
              'baseline': None if args.baseline is None else str(args.baseline),
              'median_s': median, 'runs': runs}
    if args.baseline is not None:
        result['speedup'] = median['baseline'] / median['current']
        result['baseline_commit'] = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], cwd=args.baseline, capture_output=True,
            text=True).stdout.strip()
    out.write_text(json.dumps(result, indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
