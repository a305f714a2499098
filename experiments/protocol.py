"""The selection protocol's report: every candidate PSD setting against CLIP on every condition,
ranked by its worst difference to CLIP (relative to CLIP's score there), from the finished runs
of `python -m experiments.psd_vs_clip protocol`.

    python -m experiments.protocol [--root ~/.cache/psd_jax/experiments/psd_vs_clip]
        [--out docs/results]            # from the repository root

Writes protocol.md (tables) and protocol.json (every run's metrics and the summary). Each
condition's primary metric is plan.protocol_score; differences are paired by seed (same data
order, noise draw and initialisation), with a t interval over the seeds as in experiments.report.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics

from experiments.plan import (DEFAULT_ROOT, PROTOCOL_CONDITIONS, PROTOCOL_SETTINGS, ROOT,
                              protocol_score, score)
from experiments.report import load_runs, paired, reproduced_lines

SECONDARY = {'emoji': (('R@1 (mean of both)', score),
                       ('zero-shot top-1 (groups)', 'eval/zero_shot/top1')),
             'fashion': (('linear probe', 'eval/linear_probe/accuracy'),)}


def per_seed(runs: list[dict], condition: str, setting: tuple[str, str], metric=None):
    """seed -> the condition's primary metric (or `metric`, a key of final_metrics.json)."""
    def value(metrics):
        if metric is None:
            return protocol_score(condition, metrics)
        return metric(metrics) if callable(metric) else metrics[metric]
    return {r['seed']: value(r['metrics']) for r in runs if r['condition'] == condition
            and (r['method'], r['variant']) == setting}


def summarise(runs: list[dict]) -> dict:
    """For each candidate: per condition the paired difference to CLIP (absolute and relative
    to CLIP's mean), then the worst and mean relative difference over the conditions it has."""
    clip = PROTOCOL_SETTINGS[0]
    out = {}
    for setting in PROTOCOL_SETTINGS[1:]:
        rows = {}
        for condition in PROTOCOL_CONDITIONS:
            base, mine = per_seed(runs, condition, clip), per_seed(runs, condition, setting)
            mean, low, high, n = paired(mine, base)
            if n == 0:
                continue
            clip_mean = statistics.mean(base[s] for s in mine if s in base)
            rows[condition] = {'diff': mean, 'low': low, 'high': high, 'seeds': n,
                               'clip': clip_mean, 'psd': clip_mean + mean,
                               'relative': mean / clip_mean if clip_mean else math.nan}
        relative = {c: r['relative'] for c, r in rows.items()}
        worst = min(relative, key=relative.get) if relative else None
        out['-'.join(setting)] = {
            'conditions': rows, 'worst_condition': worst,
            'worst_relative': relative[worst] if worst else math.nan,
            'mean_relative': statistics.mean(relative.values()) if relative else math.nan,
            'clean_not_below': all(r['high'] >= 0 for c, r in rows.items() if 'clean' in c),
            'intervals_above': sum(r['low'] > 0 for r in rows.values()),
            'intervals_below': sum(r['high'] < 0 for r in rows.values())}
    return out


def fmt(x: float, signed: bool = True) -> str:
    return f'{100 * x:+.1f}' if signed else f'{100 * x:.1f}'


def ranking_table(summary: dict) -> list[str]:
    lines = ['| setting | worst relative diff (condition) | mean relative diff | clean: '
             'interval not below 0 | intervals above / below 0 |', '|---|---|---|---|---|']
    for name, s in sorted(summary.items(), key=lambda kv: -kv[1]['worst_relative']):
        lines.append(f"| {name} | {fmt(s['worst_relative'])}% ({s['worst_condition']}) | "
                     f"{fmt(s['mean_relative'])}% | {'yes' if s['clean_not_below'] else 'no'} | "
                     f"{s['intervals_above']} / {s['intervals_below']} |")
    return lines


def condition_table(runs: list[dict], summary: dict, condition: str) -> list[str]:
    dataset = 'fashion' if condition.startswith('fashion') else 'emoji'
    primary = ('zero-shot top-1' if dataset == 'fashion'
               else 'mean recall (R@1/5/10, both directions)')
    head = [primary, 'PSD - CLIP [95% CI]', 'relative']
    for label, _ in SECONDARY[dataset]:
        head += [label, 'PSD - CLIP [95% CI]']
    lines = ['| setting | ' + ' | '.join(head) + ' | seeds |',
             '|---' * (len(head) + 2) + '|']
    clip = PROTOCOL_SETTINGS[0]
    for setting in PROTOCOL_SETTINGS:
        values = per_seed(runs, condition, setting)
        if not values:
            continue
        spread = statistics.stdev(values.values()) if len(values) > 1 else 0.0
        cells = [f'{fmt(statistics.mean(values.values()), False)} +- {fmt(spread, False)}']
        if setting == clip:
            cells += ['', '']
        else:
            r = summary['-'.join(setting)]['conditions'][condition]
            cells += [f"{fmt(r['diff'])} [{fmt(r['low'])}, {fmt(r['high'])}]",
                      f"{fmt(r['relative'])}%"]
        for _, key in SECONDARY[dataset]:
            second = per_seed(runs, condition, setting, key)
            cells.append(fmt(statistics.mean(second.values()), False))
            if setting == clip:
                cells.append('')
            else:
                d, lo, hi, _ = paired(second, per_seed(runs, condition, clip, key))
                cells.append(f'{fmt(d)} [{fmt(lo)}, {fmt(hi)}]')
        lines.append(f"| {'-'.join(setting)} | " + ' | '.join(cells) + f' | {len(values)} |')
    return lines


def write(root: pathlib.Path, out: pathlib.Path) -> dict:
    """protocol.md and protocol.json from the finished protocol runs under `root`."""
    runs = [r for r in load_runs(root) if r['condition'] in PROTOCOL_CONDITIONS
            and (r['method'], r['variant']) in PROTOCOL_SETTINGS]
    if not runs:
        raise SystemExit(f'no finished protocol runs under {root}: run '
                         '`python -m experiments.psd_vs_clip protocol` first')
    summary = summarise(runs)
    minutes = sum(r['wall_s'] for r in runs) / 60
    text = ['# Choosing PSD settings across datasets: the selection protocol', '',
            f'Produced by `python -m experiments.psd_vs_clip protocol --jobs 2` then '
            f'`python -m experiments.protocol` ({len(runs)} runs, {minutes:.0f} min of training '
            'and evaluation summed over runs, two runs at a time on a 2-core CPU). Every run: '
            'configs/experiments/psd_vs_clip.py (tiny ViT + text tower, 32 px, 300 steps of '
            'batch 128); numbers are percentages. Primary metric: held-out retrieval as the '
            'mean recall (R@1, R@5, R@10 in both directions) on emoji (Twitter style held out) '
            'and emoji_styles (OpenMoji held out); zero-shot top-1 on Fashion-MNIST (its '
            'captions are ten templates). A setting is ranked by its worst difference to CLIP '
            "over the conditions, relative to CLIP's score there; differences are paired by "
            'seed with 95% t intervals.', '',
            '## Ranking', ''] + ranking_table(summary)
    for condition in PROTOCOL_CONDITIONS:
        text += ['', f'## {condition}', ''] + condition_table(runs, summary, condition)
    text += ['', '## Reproducibility', '', 'Runs redone from an empty workdir with the committed '
             'code (`python -m experiments.psd_vs_clip check RUN ...`), against the stored ones:',
             ''] + reproduced_lines(root)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'protocol.md').write_text('\n'.join(text) + '\n')
    record = {'summary': summary, 'runs': [
        {k: r[k] for k in ('condition', 'method', 'variant', 'seed', 'metrics', 'wall_s')}
        for r in runs]}
    (out / 'protocol.json').write_text(json.dumps(record, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', type=pathlib.Path, default=DEFAULT_ROOT)
    parser.add_argument('--out', type=pathlib.Path, default=ROOT / 'docs' / 'results')
    args = parser.parse_args()
    summary = write(args.root, args.out)
    print('\n'.join(ranking_table(summary)))


if __name__ == '__main__':
    main()
