"""The PSD-vs-CLIP report generator on made-up finished runs (no training): seed-paired
differences with a t interval, the screen and grid tables, the plots."""

from __future__ import annotations

import json
import math
import numpy as np
import pytest

from experiments import plan, protocol, psd_vs_clip, report


def fake_run(root, condition, method, variant, seed, i2t, t2i, top1=0.2, probe=None):
    workdir = root / plan.run_name(condition, method, variant, seed)
    workdir.mkdir(parents=True)
    (workdir / 'config.json').write_text('{}')
    lines = [{'step': s, 'alpha': 0.5 * s / 300, 'step_time_s': 0.1, 'loss': 1.0}
             for s in (25, 50, 300)]
    (workdir / 'metrics.jsonl').write_text('\n'.join(json.dumps(x) for x in lines))
    metrics = {'eval/retrieval/i2t_R@1': i2t, 'eval/retrieval/t2i_R@1': t2i,
               'eval/retrieval/i2t_R@5': i2t, 'eval/retrieval/i2t_R@10': i2t,
               'eval/retrieval/t2i_R@5': t2i, 'eval/retrieval/t2i_R@10': t2i,
               'eval/zero_shot/top1': top1}
    if probe is not None:
        metrics['eval/linear_probe/accuracy'] = probe
    (workdir / 'final_metrics.json').write_text(json.dumps(metrics))


def test_report_pairs_seeds_and_writes_tables_and_plots(tmp_path, rng):
    condition = plan.SCREEN_CONDITION
    for method in plan.METHODS:
        fake_run(tmp_path, condition, method, 'base', 0, rng.uniform(0.1, 0.2),
                 rng.uniform(0.1, 0.2))
    chosen = ('psd_bank', 'base')
    (tmp_path / 'chosen.json').write_text(json.dumps({'method': chosen[0],
                                                      'variant': chosen[1]}))
    for seed in (1, 2):
        fake_run(tmp_path, condition, 'clip', 'base', seed, rng.uniform(0.1, 0.2), 0.1)
        fake_run(tmp_path, condition, *chosen, seed, rng.uniform(0.1, 0.2), 0.1)
    runs = report.load_runs(tmp_path)
    score = {(r['method'], r['seed']): plan.score(r['metrics']) for r in runs}
    diffs = [score[('psd_bank', s)] - score[('clip', s)] for s in (0, 1, 2)]
    mean, sd = np.mean(diffs), np.std(diffs, ddof=1)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    want = f'{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]'
    report.write_report(tmp_path, tmp_path / 'out')
    text = (tmp_path / 'out' / 'psd_vs_clip.md').read_text()
    row = next(line for line in text.splitlines()
               if line.startswith(f'| {condition} | retrieval R@1 (mean of both)'))
    assert want in row and row.endswith('| 3 |'), (row, want)
    shortlisted = next(line for line in text.splitlines() if line.startswith('| psd_bank | base')
                       and line.endswith('| 3 |'))
    assert want in shortlisted, (shortlisted, want)
    for method in plan.METHODS:
        assert f'| {method} | base |' in text
    assert (tmp_path / 'out' / 'psd_vs_clip_noise.png').stat().st_size > 0
    assert (tmp_path / 'out' / 'psd_vs_clip_alpha.png').stat().st_size > 0


def test_report_refuses_an_unfinished_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match='no finished runs'):
        report.write_report(tmp_path, tmp_path / 'out')


def test_conditions_and_overrides():
    assert plan.condition_overrides('emoji_clean') == ('emoji', {})
    assert plan.condition_overrides('emoji_within_group_0.4') == (
        'emoji', {'data.caption_noise': 0.4, 'data.caption_noise_kind': 'within_group'})
    assert plan.condition_overrides('fashion_shuffle_0.5')[1][
        'data.caption_noise_kind'] == 'shuffle'
    doubled = plan.method_overrides('psd_same_pass', 'temp_x2')
    assert doubled['loss.psd.teacher_temperature'] == 4.0
    assert plan.condition_overrides('emoji_styles_shuffle_0.4') == (
        'emoji_styles', {'data.caption_noise': 0.4, 'data.caption_noise_kind': 'shuffle'})
    with pytest.raises(ValueError, match="'imagenet_clean' names no dataset"):
        plan.condition_overrides('imagenet_clean')
    late = plan.method_overrides('psd_ema', 'late_x2')
    assert late['loss.alpha_start_step'] == 150 and late['loss.psd.teacher_temperature'] == 2.0
    assert all(plan.valid(*setting) for setting in plan.PROTOCOL_SETTINGS)


def test_protocol_ranks_settings_by_their_worst_relative_difference(tmp_path, rng):
    """Fake protocol runs: 'temp_x2' gains on every condition but loses 20% of CLIP's score on
    one; 'offdiag_x2' loses at most 5% anywhere: it ranks first. The paired interval and the
    relative difference match a hand computation."""
    clip_r1 = {c: rng.uniform(0.1, 0.3) for c in plan.PROTOCOL_CONDITIONS}
    change = {'temp_x2': {c: 1.1 for c in plan.PROTOCOL_CONDITIONS},
              'offdiag_x2': {c: 0.95 if 'clean' in c else 1.02
                             for c in plan.PROTOCOL_CONDITIONS}}
    change['temp_x2']['emoji_styles_clean'] = 0.8
    noise = {}
    for condition in plan.PROTOCOL_CONDITIONS:
        for seed in plan.SEEDS:
            base = clip_r1[condition] + 0.01 * seed
            fake_run(tmp_path, condition, 'clip', 'base', seed, base, base, top1=base,
                     probe=0.5)
            for variant in change:
                noise[condition, variant, seed] = rng.normal(0, 0.002)
                r1 = base * change[variant][condition] + noise[condition, variant, seed]
                fake_run(tmp_path, condition, 'psd_ema', variant, seed, r1, r1, top1=r1,
                         probe=0.5)
    summary = protocol.write(tmp_path, tmp_path / 'out')
    text = (tmp_path / 'out' / 'protocol.md').read_text()
    ranking = [line.split(' |')[0][2:] for line in text.splitlines()
               if line.startswith('| psd_ema-')][:2]
    assert ranking == ['psd_ema-offdiag_x2', 'psd_ema-temp_x2'], text
    worst = summary['psd_ema-temp_x2']
    assert worst['worst_condition'] == 'emoji_styles_clean'
    condition = 'emoji_styles_clean'
    diffs = [(clip_r1[condition] + 0.01 * s) * -0.2 + noise[condition, 'temp_x2', s]
             for s in plan.SEEDS]
    clip_mean = np.mean([clip_r1[condition] + 0.01 * s for s in plan.SEEDS])
    assert worst['worst_relative'] == pytest.approx(np.mean(diffs) / clip_mean, rel=1e-9)
    row = worst['conditions'][condition]
    half = 4.303 * np.std(diffs, ddof=1) / math.sqrt(3)
    assert (row['low'], row['high']) == pytest.approx((np.mean(diffs) - half,
                                                       np.mean(diffs) + half), rel=1e-9)
    assert not worst['clean_not_below'] and worst['intervals_below'] >= 1
    saved = json.loads((tmp_path / 'out' / 'protocol.json').read_text())
    assert len(saved['runs']) == 3 * len(plan.PROTOCOL_CONDITIONS) * 3


def test_sweep_screens_grids_shortlists_then_confirms(tmp_path, monkeypatch, rng):
    """The sweep's stages on fake runs: the screen picks the best teacher, the grid changes one
    knob of it (skipping variants that do not apply), the shortlist reruns the best few on three
    seeds and the best mean wins, and the confirmation runs CLIP and the winner everywhere."""
    settings = [(m, 'base') for m in plan.METHODS] + [
        ('psd_previous_step', v) for v in plan.VARIANTS]
    seed0 = dict(zip(settings, rng.permutation(len(settings)) / 100))
    seed0[('psd_previous_step', 'base')] = 1.0  # the best teacher on the screen
    seed0[('psd_previous_step', 'alpha0.8')] = 0.9  # second on seed 0 ...
    seed0[('psd_previous_step', 'temp_x2')] = 0.85
    later = {('psd_previous_step', 'temp_x2'): 0.95}  # ... but this one wins over three seeds
    calls = []

    def fake_run_one(root, condition, method, variant, seed):
        calls.append((condition, method, variant, seed))
        s = seed0.get((method, variant), 0.0) if seed == 0 else later.get((method, variant),
                                                                          0.5)
        return {'eval/retrieval/i2t_R@1': s, 'eval/retrieval/t2i_R@1': s}

    monkeypatch.setattr(psd_vs_clip, 'run_one', fake_run_one)
    psd_vs_clip.sweep(tmp_path, full=False)
    chosen = json.loads((tmp_path / 'chosen.json').read_text())
    assert (chosen['method'], chosen['variant']) == ('psd_previous_step', 'temp_x2')
    assert [tuple(x) for x in chosen['shortlist']] == [  # the best three of seed 0
        ('psd_previous_step', 'base'), ('psd_previous_step', 'alpha0.8'),
        ('psd_previous_step', 'temp_x2')]
    ran = set(calls)
    assert ('emoji_within_group_0.4', 'psd_previous_step', 'subset1.0', 0) not in ran
    assert not plan.valid('psd_previous_step', 'subset1.0')
    for condition in plan.CONDITIONS:
        for seed in plan.SEEDS:
            assert (condition, 'clip', 'base', seed) in ran
            assert (condition, 'psd_previous_step', 'temp_x2', seed) in ran
    assert ('emoji_clean', 'psd_previous_step', 'alpha0.8', 1) not in ran
