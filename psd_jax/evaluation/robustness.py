"""Effective robustness on ImageNet distribution shifts (Taori et al., NeurIPS 2020).

A shift's baseline is the logit-linear fit of shift accuracy against ImageNet accuracy over
standard ImageNet-trained models: logit(acc_shift) = slope * logit(acc_imagenet) + intercept.
A model's effective robustness is its shift accuracy minus the baseline's prediction at its
ImageNet accuracy; the report does this for the average over the shift sets it is given.

The project ships no coefficients: fit them with `fit_logit_linear` on the (ImageNet, shift)
accuracies of standard models you trust (e.g. the Taori et al. testbed's published results,
https://modestyachts.github.io/imagenet-testbed/), and the report records the ones it used.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SHIFTS = ('imagenet_v2', 'imagenet_r', 'imagenet_a', 'imagenet_sketch', 'objectnet')


def logit(p):
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def fit_logit_linear(imagenet: Sequence[float], shift: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through (logit ImageNet acc, logit shift
    acc) of reference models; accuracies are fractions in (0, 1)."""
    x, y = logit(imagenet), logit(shift)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f'need at least two reference models with both accuracies; got '
                         f'{x.size} ImageNet and {y.size} shift accuracies')
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def effective_robustness(imagenet_acc: float, shift_acc: float, slope: float,
                         intercept: float) -> float:
    """shift accuracy minus the baseline's prediction at this ImageNet accuracy."""
    return float(shift_acc - sigmoid(slope * logit(imagenet_acc) + intercept))


def robustness_report(accuracies: Mapping[str, float],
                      baseline: tuple[float, float]) -> dict[str, float]:
    """accuracies: {'imagenet2012': top-1, 'imagenet_v2': ..., ...} (fractions; any subset of
    SHIFTS); baseline: (slope, intercept) of the fit for the *average* shift accuracy.
    Returns the average shift accuracy, its baseline prediction and the effective robustness."""
    if 'imagenet2012' not in accuracies:
        raise ValueError("the robustness report needs the 'imagenet2012' accuracy")
    shifts = {k: v for k, v in accuracies.items() if k in SHIFTS}
    if not shifts:
        raise ValueError(f'no shift accuracies given; expected some of {list(SHIFTS)}')
    average = float(np.mean(list(shifts.values())))
    slope, intercept = baseline
    predicted = float(sigmoid(slope * logit(accuracies['imagenet2012']) + intercept))
    return {'imagenet_accuracy': float(accuracies['imagenet2012']),
            'average_shift_accuracy': average, 'baseline_prediction': predicted,
            'effective_robustness': average - predicted, 'shifts_used': float(len(shifts)),
            'baseline_slope': slope, 'baseline_intercept': intercept}
