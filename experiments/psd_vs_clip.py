"""PSD vs CLIP under caption noise: a resumable, coarse-to-fine sweep over the trainer.

    python -m experiments.psd_vs_clip run [--root ~/.cache/psd_jax/experiments/psd_vs_clip]
    python -m experiments.psd_vs_clip check RUN [RUN ...]   # rerun finished runs from scratch
    python -m experiments.psd_vs_clip protocol [--jobs 2]   # the selection protocol's runs
    python -m experiments.protocol   # docs/results/protocol.md: the settings ranked
    python -m experiments.report      # docs/results/psd_vs_clip.md + PNGs from the runs

(from the repository root). What is compared lives in experiments/plan.py.

Every run is `python -m psd_jax.main --config configs/experiments/psd_vs_clip.py:<dataset>`
with overrides, in its own workdir under --root; a run whose workdir holds final_metrics.json
is skipped, an interrupted one resumes from its checkpoint, so `run` continues a stopped sweep.
All runs have the same steps, batch and model (the same compute, up to the teacher's own cost).
Because finished runs are reused, a report can combine runs of several invocations (and code
versions that left those runs' programs unchanged); `check` reruns named runs from scratch under
--root/reproduced and records how far their final metrics are from the stored ones, and the
report lists that.

Stages (each decides from the finished runs of the one before):
  screen   seed 0, emoji with 40% of captions swapped within their subgroup: CLIP and PSD with
           every teacher source (METHODS).
  grid     seed 0, same condition: the best screened PSD method with one knob changed at a time
           (alpha_max, subset fraction, teacher temperature, alpha schedule).
  shortlist seeds 0-2, same condition: CLIP and the SHORTLIST best PSD settings of the screen
           and grid; the best mean over the three seeds is the chosen setting.
  confirm  seeds 0-2: CLIP and the chosen PSD setting on every condition in CONDITIONS (with
           --full: FULL_CONDITIONS, the whole grid of noise kinds and rates).
Selection score: held-out retrieval, the mean of image->text and text->image R@1 (emoji).

protocol   seeds 0-2: CLIP and every PROTOCOL_SETTINGS candidate on every PROTOCOL_CONDITIONS
           condition (emoji, emoji_styles and Fashion-MNIST, clean and noisy); the report
           (experiments.protocol) ranks the candidates by their worst difference to CLIP.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from experiments.plan import (CONDITIONS, CONFIG, DEFAULT_ROOT, FULL_CONDITIONS, METHODS,
                              PROTOCOL_CONDITIONS, PROTOCOL_SETTINGS, ROOT, SCREEN_CONDITION,
                              SEEDS, SHORTLIST, VARIANTS, condition_overrides, method_overrides,
                              run_name, score, valid)


def run_one(root: pathlib.Path, condition: str, method: str, variant: str, seed: int) -> dict:
    """Train + evaluate one run (or read its finished result); returns its final metrics."""
    workdir = root / run_name(condition, method, variant, seed)
    done = workdir / 'final_metrics.json'
    if not done.exists():
        dataset, overrides = condition_overrides(condition)
        overrides.update(method_overrides(method, variant))
        overrides['seed'] = seed
        cmd = [sys.executable, '-m', 'psd_jax.main', f'--config={CONFIG}:{dataset}',
               f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()]
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        print(f'[run] {run_name(condition, method, variant, seed)}', flush=True)
        with open(workdir / 'log.txt', 'a') as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if code != 0:
            raise RuntimeError(f'run failed (exit {code}); see {workdir / "log.txt"}')
        print(f'      {time.time() - start:.0f} s', flush=True)
    return json.loads(done.read_text())


def ranked(root: pathlib.Path, candidates: list[tuple[str, str]],
           seeds=(0,)) -> list[tuple[str, str]]:
    """Candidates best first by the mean score over `seeds` on the screening condition."""
    def mean_score(c):
        return sum(score(run_one(root, SCREEN_CONDITION, *c, s)) for s in seeds) / len(seeds)
    return sorted(candidates, key=mean_score, reverse=True)


def sweep(root: pathlib.Path, full: bool) -> None:
    psd_methods = [m for m in METHODS if m != 'clip']
    for method in METHODS:  # screen
        run_one(root, SCREEN_CONDITION, method, 'base', 0)
    method = ranked(root, [(m, 'base') for m in psd_methods])[0][0]
    print(f'[screen] best teacher: {method}', flush=True)
    grid = [(method, v) for v in VARIANTS if valid(method, v)]
    for setting in grid:
        run_one(root, SCREEN_CONDITION, *setting, 0)
    screened = [(m, 'base') for m in psd_methods] + grid[1:]
    shortlist = ranked(root, screened)[:SHORTLIST]
    print(f'[grid] shortlist: {shortlist}', flush=True)
    for seed in SEEDS:  # shortlist on three seeds
        for setting in [('clip', 'base')] + shortlist:
            run_one(root, SCREEN_CONDITION, *setting, seed)
    chosen = ranked(root, shortlist, SEEDS)[0]
    print(f'[shortlist] chosen: {chosen}', flush=True)
    (root / 'chosen.json').write_text(json.dumps({'method': chosen[0], 'variant': chosen[1],
                                                  'shortlist': shortlist}))
    for seed in SEEDS:  # confirm: seed-major, so an interrupted sweep has every condition
        for condition in (FULL_CONDITIONS if full else CONDITIONS):
            for m, v in (('clip', 'base'), chosen):
                run_one(root, condition, m, v, seed)


def protocol(root: pathlib.Path, jobs: int = 1) -> None:
    """Every (seed, condition, setting) run of the selection protocol, `jobs` at a time (each
    run is its own process and workdir, so the results do not depend on `jobs`)."""
    todo = [(c, m, v, s) for s in SEEDS for c in PROTOCOL_CONDITIONS
            for m, v in PROTOCOL_SETTINGS]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for _ in pool.map(lambda run: run_one(root, *run), todo):
            pass


def check(root: pathlib.Path, names: list[str]) -> list[dict]:
    """Rerun finished runs (names like 'emoji_clean/clip-base/seed0') from an empty workdir and
    compare every eval/ metric with the stored result; appends to root/reproduced.json."""
    out = root / 'reproduced.json'
    records = json.loads(out.read_text()) if out.exists() else []
    for name in names:
        condition, setting, seed = name.strip('/').split('/')
        method, _, variant = setting.partition('-')
        stored_file = root / name / 'final_metrics.json'
        if not stored_file.exists():
            raise FileNotFoundError(f'{stored_file}: {name} has not finished; nothing to check')
        stored = json.loads(stored_file.read_text())
        again = run_one(root / 'reproduced' / time.strftime('%Y%m%d-%H%M%S'), condition, method,
                        variant, int(seed.removeprefix('seed')))
        diffs = {k: abs(again[k] - v) for k, v in stored.items() if k.startswith('eval/')}
        worst = max(diffs, key=diffs.get)
        records.append({'run': name, 'metrics': len(diffs), 'max_abs_diff': diffs[worst],
                        'worst_metric': worst, 'stored_at': time.strftime(
                            '%Y-%m-%d %H:%M', time.gmtime(stored_file.stat().st_mtime)),
                        'rerun_at': time.strftime('%Y-%m-%d %H:%M', time.gmtime())})
        out.write_text(json.dumps(records, indent=1))  # after each run: an interruption
        print(f'[check] {name}: {len(diffs)} metrics, max |diff| {diffs[worst]:.2g} ({worst})',
              flush=True)                              # keeps what was checked
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('command', choices=('run', 'check', 'protocol'))
    parser.add_argument('runs', nargs='*', help="check: runs to redo, e.g. "
                        "'emoji_clean/clip-base/seed0'")
    parser.add_argument('--root', type=pathlib.Path, default=DEFAULT_ROOT,
                        help='where the runs live (outside the repository)')
    parser.add_argument('--full', action='store_true', help='confirm on FULL_CONDITIONS')
    parser.add_argument('--jobs', type=int, default=1, help='protocol: runs at a time')
    args = parser.parse_args()
    if args.command == 'check':
        check(args.root, args.runs)
    elif args.command == 'protocol':
        start = time.time()
        protocol(args.root, args.jobs)
        print(f'protocol finished in {(time.time() - start) / 60:.1f} min; write the report with '
              f'python -m experiments.protocol --root {args.root}', flush=True)
    else:
        start = time.time()
        sweep(args.root, args.full)
        print(f'sweep finished in {(time.time() - start) / 60:.1f} min; write the report with '
              f'python -m experiments.report --root {args.root}', flush=True)


if __name__ == '__main__':
    main()
