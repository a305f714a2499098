"""Effective robustness on ImageNet distribution shifts (Taori et al., NeurIPS 2020).

A shift's baseline is the logit-linear fit of shift accuracy against ImageNet accuracy over
standard ImageNet-trained models: logit(acc_shift) = slope * logit(acc_imagenet) + intercept.
A model's effective robustness is its shift accuracy minus the baseline's prediction at its
ImageNet accuracy; the report does this for the average over the shift sets it is given (the
average of the per-shift predictions, so any subset of shifts is compared like with like).

The baselines are fitted here, by `testbed_baselines()`, to the 85 "Standard training" models of
the ImageNet testbed (imagenet_testbed_standard.tsv: copied columns of the testbed's
robustness_top1s.csv, github.com/modestyachts/imagenet-testbed at commit 28477dc; see the file's
header). x is top-1 on the ImageNet validation set; y as the testbed measures it (ImageNet-R/-A on
their 200-class subsets, ObjectNet on its 113 overlapping classes, so evaluate your model the
same way). Fitted values (n models, Pearson r in logit space):
  imagenet_v2     slope 0.916  intercept -0.485  (n 85, r 0.999)
  imagenet_r      slope 0.887  intercept -1.571  (n 80, r 0.973)
  imagenet_sketch slope 1.200  intercept -2.532  (n 85, r 0.971)
  imagenet_a      slope 1.822  intercept -4.875  (n 84, r 0.750: a weak line; ImageNet-A was
                  filtered adversarially against ResNet-50, whose 0% is left out of the fit)
  objectnet       slope 1.126  intercept -1.930  (n 85, r 0.985)
"""

from __future__ import annotations

import functools
import pathlib
from typing import Mapping, Sequence

import numpy as np

SHIFTS = ('imagenet_v2', 'imagenet_r', 'imagenet_sketch', 'imagenet_a', 'objectnet')
TESTBED_TABLE = pathlib.Path(__file__).with_name('imagenet_testbed_standard.tsv')
TESTBED_COLUMNS = {'imagenet2012': 'val', 'imagenet_v2': 'imagenetv2-matched-frequency',
                   'imagenet_r': 'imagenet-r', 'imagenet_sketch': 'imagenet-sketch',
                   'imagenet_a': 'imagenet-a', 'objectnet': 'objectnet-1.0-beta'}


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


def read_testbed(path: pathlib.Path = TESTBED_TABLE) -> dict[str, np.ndarray]:
    """The shipped testbed table as {our dataset name: accuracies as fractions (NaN: absent)}
    plus 'model': names."""
    lines = [l.rstrip('\n') for l in path.read_text().splitlines() if not l.startswith('#')]
    header = lines[0].split('\t')
    rows = [l.split('\t') for l in lines[1:] if l]
    out = {'model': np.array([r[0] for r in rows])}
    for ours, theirs in TESTBED_COLUMNS.items():
        i = header.index(theirs)
        out[ours] = np.array([float(r[i]) / 100 if r[i] else np.nan for r in rows])
    return out


@functools.lru_cache(maxsize=None)
def testbed_baselines() -> dict[str, tuple[float, float]]:
    """{shift: (slope, intercept)} fitted to the testbed's standard models (models without the
    shift, or at 0% on it, are left out of that shift's fit)."""
    table = read_testbed()
    out = {}
    for shift in SHIFTS:
        keep = np.isfinite(table[shift]) & (table[shift] > 0)
        out[shift] = fit_logit_linear(table['imagenet2012'][keep], table[shift][keep])
    return out


def effective_robustness(imagenet_acc: float, shift_acc: float, slope: float,
                         intercept: float) -> float:
    """shift accuracy minus the baseline's prediction at this ImageNet accuracy."""
    return float(shift_acc - sigmoid(slope * logit(imagenet_acc) + intercept))


def robustness_report(accuracies: Mapping[str, float],
                      baseline: tuple[float, float] | None = None) -> dict[str, float]:
    """accuracies: {'imagenet2012': top-1, 'imagenet_v2': ..., ...} (fractions; any subset of
    SHIFTS). baseline None: each shift's testbed line, averaged over the shifts given; or one
    (slope, intercept) line for the *average* shift accuracy (a fit of your own).
    Returns the average shift accuracy, its baseline prediction and the effective robustness,
    and per shift the effective robustness against its own line (testbed baselines only)."""
    if 'imagenet2012' not in accuracies:
        raise ValueError("the robustness report needs the 'imagenet2012' accuracy")
    unknown = sorted(set(accuracies) - set(SHIFTS) - {'imagenet2012'})
    if unknown:
        raise ValueError(f'unknown datasets {unknown}; allowed: imagenet2012 and {list(SHIFTS)}')
    shifts = {k: float(v) for k, v in accuracies.items() if k in SHIFTS}
    if not shifts:
        raise ValueError(f'no shift accuracies given; expected some of {list(SHIFTS)}')
    for name, value in {**shifts, 'imagenet2012': accuracies['imagenet2012']}.items():
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f'{name} accuracy {value} is not a fraction in [0, 1]')
    imagenet = float(accuracies['imagenet2012'])
    average = float(np.mean(list(shifts.values())))
    out = {'imagenet_accuracy': imagenet, 'average_shift_accuracy': average,
           'shifts_used': float(len(shifts))}
    if baseline is None:
        lines = testbed_baselines()
        predicted = {k: float(sigmoid(lines[k][0] * logit(imagenet) + lines[k][1]))
                     for k in shifts}
        out['baseline_prediction'] = float(np.mean(list(predicted.values())))
        out.update({f'effective_robustness/{k}': shifts[k] - predicted[k] for k in shifts})
    else:
        slope, intercept = baseline
        out['baseline_prediction'] = float(sigmoid(slope * logit(imagenet) + intercept))
        out.update(baseline_slope=float(slope), baseline_intercept=float(intercept))
    out['effective_robustness'] = average - out['baseline_prediction']
    return out
