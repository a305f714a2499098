"""The PSD vs CLIP report: tables (mean +- std over seeds, PSD - CLIP with a 95% interval) and
plots from the finished runs of experiments/psd_vs_clip.py.

    python -m experiments.report [--root ~/.cache/psd_jax/experiments/psd_vs_clip]
        [--out docs/results]            # from the repository root

Differences are paired by seed (same data order, noise draw and initialisation): the interval
is mean +- t(0.975, n-1) * sd / sqrt(n) of the per-seed differences.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics

from experiments.plan import (CONDITIONS, DEFAULT_ROOT, FULL_CONDITIONS, METHODS, ROOT,
                              SCREEN_CONDITION, VARIANTS, score)

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}
EMOJI_METRICS = (('retrieval R@1 (mean of both)', score),
                 ('i2t R@1', 'eval/retrieval/i2t_R@1'), ('i2t R@5', 'eval/retrieval/i2t_R@5'),
                 ('i2t R@10', 'eval/retrieval/i2t_R@10'), ('t2i R@1', 'eval/retrieval/t2i_R@1'),
                 ('t2i R@5', 'eval/retrieval/t2i_R@5'), ('t2i R@10', 'eval/retrieval/t2i_R@10'),
                 ('zero-shot top-1 (groups)', 'eval/zero_shot/top1'))
FASHION_METRICS = (('zero-shot top-1', 'eval/zero_shot/top1'),
                   ('linear probe', 'eval/linear_probe/accuracy'))


def load_runs(root: pathlib.Path) -> list[dict]:
    """Every finished run: condition, method, variant, seed, metrics, step time, wall time."""
    runs = []
    for done in sorted(root.glob('*/*/seed*/final_metrics.json')):
        workdir = done.parent
        method, _, variant = workdir.parent.name.partition('-')
        lines = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
        times = [x['step_time_s'] for x in lines if 'step_time_s' in x][1:]  # drop compile
        runs.append({'condition': workdir.parent.parent.name, 'method': method,
                     'variant': variant, 'seed': int(workdir.name[4:]),
                     'metrics': json.loads(done.read_text()),
                     'step_time_s': statistics.median(times) if times else float('nan'),
                     'wall_s': done.stat().st_mtime - (workdir / 'config.json').stat().st_mtime,
                     'alpha': [(x['step'], x['alpha']) for x in lines if 'alpha' in x]})
    return runs


def value(run: dict, metric) -> float:
    return metric(run['metrics']) if callable(metric) else run['metrics'][metric]


def mean_std(xs: list[float]) -> str:
    if not xs:
        return '-'
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f'{100 * statistics.mean(xs):.1f} +- {100 * sd:.1f}'


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the per-seed differences a - b with a 95% t interval (with one
    seed the interval is the point; nan and n = 0 with none)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return math.nan, math.nan, math.nan, 0
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.mean(diffs)
    half = (T_975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
            if len(diffs) > 1 else 0.0)
    return mean, mean - half, mean + half, len(diffs)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> str:
    mean, low, high, n = paired(a, b)
    if n == 0:
        return '-'
    if n < 2:
        return f'{100 * mean:+.1f} (1 seed)'
    return f'{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]'


def screen_table(runs: list[dict], condition: str) -> list[str]:
    rows = [r for r in runs if r['condition'] == condition and r['seed'] == 0]
    lines = ['| method | setting | R@1 mean | i2t R@1 | t2i R@1 | zero-shot | s/step |',
             '|---|---|---|---|---|---|---|']
    for r in sorted(rows, key=lambda r: (list(METHODS).index(r['method']),
                                         list(VARIANTS).index(r['variant']))):
        m = r['metrics']
        lines.append(f"| {r['method']} | {r['variant']} | {100 * score(m):.1f} | "
                     f"{100 * m['eval/retrieval/i2t_R@1']:.1f} | "
                     f"{100 * m['eval/retrieval/t2i_R@1']:.1f} | "
                     f"{100 * m['eval/zero_shot/top1']:.1f} | {r['step_time_s']:.3f} |")
    return lines


def confirm_table(runs: list[dict], chosen: tuple[str, str], conditions) -> list[str]:
    lines = ['| condition | metric | CLIP | PSD | PSD - CLIP [95% CI] | seeds |',
             '|---|---|---|---|---|---|']
    for condition in conditions:
        metrics = EMOJI_METRICS if condition.startswith('emoji') else FASHION_METRICS
        by = {}
        for key in (('clip', 'base'), chosen):
            by[key] = {r['seed']: r for r in runs if r['condition'] == condition
                       and (r['method'], r['variant']) == key}
        if not by[('clip', 'base')] or not by[chosen]:
            continue
        for label, metric in metrics:
            clip = {s: value(r, metric) for s, r in by[('clip', 'base')].items()}
            psd = {s: value(r, metric) for s, r in by[chosen].items()}
            lines.append(f'| {condition} | {label} | {mean_std(list(clip.values()))} | '
                         f'{mean_std(list(psd.values()))} | {paired_difference(psd, clip)} | '
                         f'{len(set(clip) & set(psd))} |')
    return lines


def shortlist_table(runs: list[dict], shortlist: list[tuple[str, str]]) -> list[str]:
    """The shortlist on three seeds at the screening condition: score mean +- std and the
    paired difference to CLIP."""
    def scores(key):
        return {r['seed']: score(r['metrics']) for r in runs if r['condition'] ==
                SCREEN_CONDITION and (r['method'], r['variant']) == key}
    clip = scores(('clip', 'base'))
    lines = ['| method | setting | R@1 mean (both directions) | PSD - CLIP [95% CI] | seeds |',
             '|---|---|---|---|---|', f'| clip | base | {mean_std(list(clip.values()))} | | '
             f'{len(clip)} |']
    for key in shortlist:
        psd = scores(key)
        lines.append(f'| {key[0]} | {key[1]} | {mean_std(list(psd.values()))} | '
                     f'{paired_difference(psd, clip)} | {len(psd)} |')
    return lines


def verdict(table: list[str]) -> str:
    """A plain sentence on how many of the confirmation's intervals exclude zero."""
    above = below = total = 0
    for line in table[2:]:
        cell = line.split('|')[5].strip()
        if '[' not in cell:
            continue
        low, high = (float(x) for x in cell[cell.index('[') + 1:cell.index(']')].split(','))
        total += 1
        above += low > 0
        below += high < 0
    if not total:
        return 'No condition has several seeds yet.'
    if above == 0 and below == 0:
        return (f'**No difference beyond the seed noise**: all {total} PSD - CLIP intervals '
                '(condition x metric, paired over seeds) include zero.')
    return (f'{above} of {total} PSD - CLIP intervals lie above zero and {below} below zero '
            '(condition x metric, paired over seeds; with this many comparisons about one in '
            'twenty excludes zero by chance).')


def plot_noise(runs: list[dict], chosen: tuple[str, str], out: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kinds, (label, metric) in (
            (axes[0], ('shuffle', 'within_group', 'group_name'), EMOJI_METRICS[0]),
            (axes[1], ('shuffle',), FASHION_METRICS[0])):
        dataset = 'emoji' if ax is axes[0] else 'fashion'
        for kind in kinds:
            for key, style in ((('clip', 'base'), '--'), (chosen, '-')):
                xs, ys, es = [], [], []
                for rate in (0.0, 0.2, 0.4, 0.5):
                    condition = f'{dataset}_clean' if rate == 0 else f'{dataset}_{kind}_{rate}'
                    vals = [value(r, metric) for r in runs if r['condition'] == condition
                            and (r['method'], r['variant']) == key]
                    if vals:
                        xs.append(rate)
                        ys.append(100 * statistics.mean(vals))
                        es.append(100 * statistics.stdev(vals) if len(vals) > 1 else 0.0)
                if len(xs) > 1:
                    name = 'CLIP' if key[0] == 'clip' else f'{key[0]} ({key[1]})'
                    ax.errorbar(xs, ys, yerr=es, linestyle=style, marker='o', capsize=3,
                                label=f'{name}, {kind}')
        ax.set_xlabel('fraction of training captions corrupted')
        ax.set_ylabel(f'{label} (%)')
        ax.set_title(f'{dataset}: mean +- std over seeds')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / 'psd_vs_clip_noise.png', dpi=120)
    plt.close(fig)


def plot_alpha(runs: list[dict], chosen: tuple[str, str], out: pathlib.Path) -> None:
    """a (the teacher's weight) against the step, as logged, for every schedule the grid tried."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    shown = set()
    for r in runs:
        key = (r['method'], r['variant'])
        if r['method'] != chosen[0] or key in shown or not r['alpha'] or r['seed'] != 0:
            continue
        shown.add(key)
        steps, alphas = zip(*r['alpha'])
        ax.plot(steps, alphas, marker='.', linewidth=2.5 if key == chosen else 1,
                label=f"{r['variant']}{' (chosen)' if key == chosen else ''}")
    ax.set_xlabel('step')
    ax.set_ylabel('a (weight of the teacher)')
    ax.set_title(f'a schedules tried with {chosen[0]}')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / 'psd_vs_clip_alpha.png', dpi=120)
    plt.close(fig)


def reproduced_lines(root: pathlib.Path) -> list[str]:
    """The `check` reruns: each named run redone from scratch vs its stored metrics."""
    path = root / 'reproduced.json'
    if not path.exists():
        return ['(no run was rechecked: `python -m experiments.psd_vs_clip check RUN ...`)']
    lines = ['| run | stored | rerun | eval metrics | max abs difference |',
             '|---|---|---|---|---|']
    for r in json.loads(path.read_text()):
        lines.append(f"| {r['run']} | {r['stored_at']} | {r['rerun_at']} | {r['metrics']} | "
                     f"{r['max_abs_diff']:.2g} ({r['worst_metric']}) |")
    return lines


def step_time_lines(root_dir: pathlib.Path) -> list[str]:
    path = root_dir / 'benchmarks' / 'results' / 'step_time.json'
    if not path.exists():
        return ['(run `python benchmarks/step_time.py` for the compiled-step ratios)']
    data = json.loads(path.read_text())
    lines = [f"Compiled train step alone ({data['config']}, `python benchmarks/step_time.py`, "
             'median of the runs):', '', '| variant | ms/step | PSD / CLIP |', '|---|---|---|']
    for row in data['rows']:
        lines.append(f"| {row['variant']} | {row['ms_per_step']:.1f} | "
                     f"{row['ratio_to_clip']:.3f} |")
    return lines


COMPARED = [
    '## What was compared', '',
    '- `clip`: the CLIP loss. Every PSD method: soft targets on a random half of each batch, '
    'a ramped linearly from 0 to `alpha_max` = 0.5 over the run, teacher temperature '
    'relative to the student\'s.',
    '- `psd_same_pass`: this step\'s own logits at teacher temperature 2 (no added compute).',
    '- `psd_same_pass_offdiag`: this step\'s logits at temperature 1 with the matching pair '
    'removed from the teacher distribution (no added compute).',
    '- `psd_bank`: each pair\'s embeddings from its previous visit, one epoch earlier (no '
    'added forward; PS-KD-style).',
    '- `psd_second_pass`: a stop-gradient forward of the current parameters over the subset '
    'on the un-augmented view.',
    '- `psd_ema`: the same forward with EMA parameters (momentum 0.99; ALBEF-style).',
    '- `psd_previous_step`: DLB-style, no added compute: the first half of each batch '
    'repeats half of the previous batch (fresh crops), and the previous step\'s embeddings '
    'of those pairs are the teacher among them (the subset is those pairs, not random).',
    '- Grid (one knob at a time around the best screened teacher): alpha_max 0.8, subset '
    'fraction 1.0, teacher temperature doubled, a schedule cosine or constant instead of '
    'linear (plot below).',
    '- Noise: `shuffle` gives a chosen caption another random record\'s caption; '
    '`within_group` swaps captions among records of the same emoji subgroup (plausible '
    'captions of related images, the many-to-many noise of web data); `group_name` (in '
    '`--full`) replaces captions by the subgroup\'s name. Fashion-MNIST captions are '
    '\'a photo of a {class}.\'; shuffling half of them gives about 45% wrong labels.',
    '',
]


def write_report(root: pathlib.Path, out: pathlib.Path) -> None:
    runs = [r for r in load_runs(root) if r['variant'] in VARIANTS]  # not the protocol's
    if not runs:
        raise FileNotFoundError(f'no finished runs under {root}; run the sweep first')
    chosen_file = root / 'chosen.json'
    if not chosen_file.exists():
        raise FileNotFoundError(f'{chosen_file} is missing: the sweep has not finished its grid')
    chosen_json = json.loads(chosen_file.read_text())
    chosen = (chosen_json['method'], chosen_json['variant'])
    shortlist = [tuple(x) for x in chosen_json.get('shortlist', [chosen])]
    out.mkdir(parents=True, exist_ok=True)
    conditions = [c for c in FULL_CONDITIONS + CONDITIONS if any(
        r['condition'] == c for r in runs)]
    conditions = list(dict.fromkeys(conditions))
    wall = sum(r['wall_s'] for r in runs) / 60
    table = confirm_table(runs, chosen, conditions)
    text = [
        '# PSD vs CLIP under caption noise',
        '',
        'Produced by `python -m experiments.psd_vs_clip run --full` then '
        '`python -m experiments.report` '
        f'({len(runs)} runs, {wall:.0f} min of training and evaluation on a 2-core CPU, '
        'summed over runs). Numbers are percentages. Every run: the tiny ViT + text tower, '
        '300 steps of batch 128 (configs/experiments/psd_vs_clip.py).',
        '',
        f'## Screen: every teacher source (seed 0, {SCREEN_CONDITION})',
        '', *screen_table([r for r in runs if r['variant'] == 'base'], SCREEN_CONDITION), '',
        f'## Grid around the best teacher (seed 0, {SCREEN_CONDITION})',
        '', *screen_table([r for r in runs if r['method'] == chosen[0]], SCREEN_CONDITION), '',
        f'## Shortlist: the best {len(shortlist)} settings of the screen and grid on three '
        f'seeds ({SCREEN_CONDITION})', '', *shortlist_table(runs, shortlist), '',
        f'Chosen (best mean over the seeds): **{chosen[0]} ({chosen[1]})**.', '',
        '## Confirmation: CLIP vs the chosen PSD setting over seeds', '',
        verdict(table), '', *table, '',
        '![metric vs noise](psd_vs_clip_noise.png)', '',
        '![a schedule](psd_vs_clip_alpha.png)', '',
        '## Reproducibility', '',
        'The sweep reuses finished runs, so the runs above come from more than one invocation. '
        'These were rerun from an empty workdir with the committed code '
        '(`python -m experiments.psd_vs_clip check RUN ...`); differences of metrics that are '
        'fractions:', '',
        *reproduced_lines(root), '',
        '## Step time', '', *step_time_lines(ROOT), '',
        *COMPARED, '',
        'Per-run s/step in the tables above is the logged wall time per step including the '
        'input pipeline.', '']
    (out / 'psd_vs_clip.md').write_text('\n'.join(text))
    plot_noise(runs, chosen, out)
    plot_alpha(runs, chosen, out)
    print(f'wrote {out / "psd_vs_clip.md"}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', type=pathlib.Path, default=DEFAULT_ROOT,
                        help='where the sweep wrote its runs')
    parser.add_argument('--out', type=pathlib.Path, default=ROOT / 'docs' / 'results')
    args = parser.parse_args()
    write_report(args.root, args.out)


if __name__ == '__main__':
    main()
