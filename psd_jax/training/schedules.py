"""Learning-rate and PSD mixing-weight (alpha) schedules: pure functions of the step.

Both are jnp-traceable (step may be a traced int32) and return float32 scalars.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

ALPHA_SCHEDULES = ('linear', 'cosine', 'constant')


def _progress(step, start: int, end: int):
    """Fraction of [start, end] elapsed at `step`, clipped to [0, 1]."""
    step = jnp.asarray(step, jnp.float32)
    span = max(end - start, 1)
    return jnp.clip((step - start) / span, 0.0, 1.0)


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int = 0,
                  end_lr_fraction: float = 0.0) -> Callable:
    """Linear warmup from 0 to `base_lr` over `warmup_steps`, then cosine decay to
    `base_lr * end_lr_fraction` at `total_steps`."""
    if total_steps <= 0:
        raise ValueError(f'total_steps={total_steps} must be positive')
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f'warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]')
    if base_lr < 0:
        raise ValueError(f'learning rate {base_lr} must be >= 0')
    end_lr = base_lr * end_lr_fraction

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * (step + 1) / max(warmup_steps, 1)
        frac = _progress(step, warmup_steps, total_steps)
        cosine = end_lr + (base_lr - end_lr) * 0.5 * (1 + jnp.cos(math.pi * frac))
        return jnp.where(step < warmup_steps, warm, cosine).astype(jnp.float32)

    return schedule


def alpha_schedule(kind: str, alpha_max: float, total_steps: int, start_step: int = 0) -> Callable:
    """The PSD mixing weight a_t: `linear` ramp 0 -> alpha_max from `start_step` to the end of
    training, `cosine` (half-cosine ramp over the same span), or `constant` alpha_max."""
    if kind not in ALPHA_SCHEDULES:
        raise ValueError(f'psd.alpha_schedule={kind!r} is not known; allowed: '
                         f'{list(ALPHA_SCHEDULES)}')
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f'psd.alpha_max={alpha_max} must be in [0, 1]')
    if total_steps <= 0:
        raise ValueError(f'total_steps={total_steps} must be positive')

    def schedule(step):
        frac = _progress(step, start_step, total_steps)
        if kind == 'constant':
            value = jnp.full((), alpha_max)
        elif kind == 'linear':
            value = alpha_max * frac
        else:
            value = alpha_max * 0.5 * (1 - jnp.cos(math.pi * frac))
        return jnp.asarray(value, jnp.float32)

    return schedule
