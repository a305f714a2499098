"""What the PSD-vs-CLIP sweep compares: its methods, grid variants, conditions and seeds, the
selection score and the run names. Shared by the sweep runner (experiments.psd_vs_clip) and the
report generator (experiments.report); imports neither.
"""

from __future__ import annotations

import os
import pathlib

from psd_jax import losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'experiments' / 'psd_vs_clip.py'
DEFAULT_ROOT = pathlib.Path(os.environ.get('PSD_JAX_CACHE', pathlib.Path.home() / '.cache' /
                                           'psd_jax')) / 'experiments' / 'psd_vs_clip'
SEEDS = (0, 1, 2)

# method -> loss overrides (teacher temperature relative to the student's)
METHODS = {
    'clip': {'loss.kind': 'clip'},
    'psd_same_pass': {'loss.kind': 'psd', 'loss.psd.teacher': 'same_pass',
                      'loss.psd.teacher_temperature': 2.0},
    'psd_same_pass_offdiag': {'loss.kind': 'psd', 'loss.psd.teacher': 'same_pass',
                              'loss.psd.teacher_temperature': 1.0,
                              'loss.psd.teacher_diagonal': 'remove'},
    'psd_bank': {'loss.kind': 'psd', 'loss.psd.teacher': 'bank',
                 'loss.psd.teacher_temperature': 1.0},
    'psd_second_pass': {'loss.kind': 'psd', 'loss.psd.teacher': 'second_pass',
                        'loss.psd.teacher_temperature': 1.0},
    'psd_ema': {'loss.kind': 'psd', 'loss.psd.teacher': 'ema',
                'loss.psd.teacher_temperature': 1.0, 'loss.psd.ema_momentum': 0.99},
    'psd_previous_step': {'loss.kind': 'psd', 'loss.psd.teacher': 'previous_step',
                          'loss.psd.teacher_temperature': 1.0},
}
# grid variants: one knob changed from the base (subset 0.5, alpha_max 0.5 linear)
VARIANTS = {
    'base': {},
    'alpha0.8': {'loss.alpha_max': 0.8},
    'subset1.0': {'loss.psd.subset_fraction': 1.0},
    'temp_x2': 'double',  # teacher temperature doubled
    'alpha_cosine': {'loss.alpha_schedule': 'cosine'},
    'alpha_constant': {'loss.alpha_schedule': 'constant'},
}
# the selection protocol's candidates beside the sweep's choice (psd_ema temp_x2): soft targets
# weighted by the teacher's off-diagonal evidence, distilling from half-way, a sharper teacher
CANDIDATES = {
    'offdiag_x2': {'loss.psd.teacher_temperature': 2.0, 'loss.psd.soft_weight': 'off_diagonal'},
    'late_x2': {'loss.psd.teacher_temperature': 2.0, 'loss.alpha_start_step': 150},
    'temp_half': {'loss.psd.teacher_temperature': 0.5},
}
SHORTLIST = 3
SCREEN_CONDITION = 'emoji_within_group_0.4'
CONDITIONS = ('emoji_within_group_0.4', 'emoji_clean', 'emoji_shuffle_0.4',
              'fashion_shuffle_0.5', 'fashion_clean')
FULL_CONDITIONS = ('emoji_clean',) + tuple(
    f'emoji_{kind}_{rate}' for kind in ('shuffle', 'within_group', 'group_name')
    for rate in (0.2, 0.4)) + ('fashion_clean', 'fashion_shuffle_0.5')


# Selection protocol: CLIP and each candidate PSD setting on every condition (three datasets,
# clean and noisy), three seeds; a setting is scored by its worst difference to CLIP over the
# conditions, relative to CLIP's score there (so that no dataset's scale dominates).
PROTOCOL_CONDITIONS = ('emoji_clean', 'emoji_shuffle_0.4', 'emoji_within_group_0.4',
                       'emoji_styles_clean', 'emoji_styles_shuffle_0.4', 'fashion_clean',
                       'fashion_shuffle_0.5')
PROTOCOL_SETTINGS = (('clip', 'base'), ('psd_ema', 'temp_x2'), ('psd_ema', 'offdiag_x2'),
                     ('psd_ema', 'late_x2'), ('psd_ema', 'temp_half'))
DATASETS = ('emoji_styles', 'emoji', 'fashion')  # longest first: prefixes of condition names


def condition_overrides(condition: str) -> tuple[str, dict]:
    """'emoji_within_group_0.4' -> ('emoji', {caption noise overrides})."""
    dataset = next((d for d in DATASETS if condition.startswith(d + '_')), None)
    if dataset is None:
        raise ValueError(f'condition {condition!r} names no dataset of {DATASETS}')
    rest = condition[len(dataset) + 1:]
    if rest == 'clean':
        return dataset, {}
    kind, _, rate = rest.rpartition('_')
    return dataset, {'data.caption_noise': float(rate), 'data.caption_noise_kind': kind}


def method_overrides(method: str, variant: str = 'base') -> dict:
    overrides = dict(METHODS[method])
    if overrides['loss.kind'] == 'psd':  # the sweep's runs predate the off-diagonal default:
        overrides['loss.psd.soft_weight'] = 'constant'  # pinned, so that they rerun the same
    change = VARIANTS[variant] if variant in VARIANTS else CANDIDATES[variant]
    if change == 'double':
        overrides['loss.psd.teacher_temperature'] = 2 * overrides['loss.psd.teacher_temperature']
    else:
        overrides.update(change)
    return overrides


def valid(method: str, variant: str) -> bool:
    """Whether the variant applies to the method (e.g. the previous-step teacher repeats at
    most half of each batch, so it has no subset fraction 1.0)."""
    overrides = method_overrides(method, variant)
    if overrides['loss.kind'] != 'psd':
        return variant == 'base'
    psd = {k.split('.')[-1]: v for k, v in overrides.items() if k.startswith('loss.psd.')}
    try:
        losses.LossConfig.from_mapping('psd', psd)
    except ValueError:
        return False
    return True


def run_name(condition: str, method: str, variant: str, seed: int) -> str:
    return f'{condition}/{method}-{variant}/seed{seed}'


def score(result: dict) -> float:
    """Selection score: mean held-out R@1 of both directions (emoji)."""
    return 0.5 * (result['eval/retrieval/i2t_R@1'] + result['eval/retrieval/t2i_R@1'])


RECALLS = tuple(f'eval/retrieval/{d}_R@{k}' for d in ('i2t', 't2i') for k in (1, 5, 10))


def mean_recall(result: dict) -> float:
    """The mean of R@1, R@5 and R@10 in both directions (rsum / 6)."""
    return sum(result[k] for k in RECALLS) / len(RECALLS)


def protocol_score(condition: str, result: dict) -> float:
    """A condition's primary metric: held-out retrieval as the mean recall (R@1 alone sits
    near its floor on OpenMoji, 1.4%, where one image of 1,911 moves it 0.05 points, so a
    relative score on it would be mostly noise); zero-shot top-1 on Fashion-MNIST, whose
    captions are ten templates."""
    if condition.startswith('fashion'):
        return result['eval/zero_shot/top1']
    return mean_recall(result)
