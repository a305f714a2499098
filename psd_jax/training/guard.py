"""The divergence guard: a step whose loss or gradient norm is not finite, or whose update is
larger than the parameters it changes, is not applied, and a run that keeps producing such
steps stops, naming its last good checkpoint.

Why the update-to-parameter norm ratio: a run blowing up under too high a learning rate keeps a
finite loss for many steps (measured on the tiny config at lr=100: the contrastive loss sits at
ln(batch) = 3.47, collapsed, while the parameter norm grows 18x per step, 43 -> 1.3e18 in 13
steps, before the first NaN), so a loss rule sees nothing; decoupled weight decay with
lr * weight_decay > 2 multiplies every weight by |1 - lr * wd| > 1 per step. A healthy AdamW
step moves each weight by about lr (1e-3 at most) against weights of about 0.02: a ratio of
0.05 or less; a ratio above 1 means one step changed the weights by more than their own size.
`train.max_update_ratio` (default 1.0; 0 switches the rule off) sets the bound.

On the device (`is_finite`, `may_apply` and `count_skips`, inside the jitted step: scalar
checks and a `lax.cond` around applying the update): the update is applied only when the step
passes; otherwise everything but the step counter stays as it was, and the state's `health`
counts the skip. On the host (`exceeded`, every step, reading the previous step's counters so
the device never waits): `train.nonfinite='stop'` stops at the first skipped step, `'skip'`
after `train.nonfinite_limit` skips in a row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

POLICIES = ('skip', 'stop')


class TrainingDiverged(RuntimeError):
    """The run produced non-finite steps beyond what its config tolerates."""


def initial_health() -> dict[str, jax.Array]:
    """{'skipped_in_a_row', 'skipped_total'}: int32 counters kept in the train state."""
    return {'skipped_in_a_row': jnp.zeros((), jnp.int32),
            'skipped_total': jnp.zeros((), jnp.int32)}


def is_finite(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """Whether a step may be applied: its loss and gradient norm are finite (bool scalar). The
    update is then finite too: from finite gradients (the norm bounds every element, and its
    square is finite) AdamW's moments, its bounded step and the weight decay stay finite."""
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def may_apply(finite: jax.Array, update_ratio: jax.Array, max_ratio: float) -> jax.Array:
    """Whether a step's update is applied: finite, and (unless max_ratio is 0) its norm at most
    `max_ratio` times the parameters' norm (bool scalar)."""
    if not max_ratio:
        return finite
    return finite & (update_ratio <= max_ratio)


def count_skips(health: dict[str, jax.Array], finite: jax.Array) -> dict[str, jax.Array]:
    """The state's counters after a step that was applied (`finite`) or skipped."""
    return {'skipped_in_a_row': jnp.where(finite, 0, health['skipped_in_a_row'] + 1),
            'skipped_total': health['skipped_total'] + (~finite).astype(jnp.int32)}


def exceeded(in_a_row: int, total: int, policy: str, limit: int) -> bool:
    """Whether the skips so far stop the run under `policy` ('skip': `limit` in a row;
    'stop': any)."""
    return total > 0 and (policy == 'stop' or in_a_row >= limit)


def why_skipped(metrics: dict, max_ratio: float) -> str:
    """Why a step was skipped, from its (host) metrics."""
    loss, grad_norm = float(metrics['loss']), float(metrics['grad_norm'])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f'non-finite loss or gradient norm (loss {loss:.4g}, gradient norm {grad_norm:.4g})'
    return (f'update {float(metrics["update_ratio"]):.3g}x the parameters\' norm, above '
            f'train.max_update_ratio={max_ratio:g}')


def diverged_message(step: int, in_a_row: int, total: int, first_reason: str, policy: str,
                     limit: int, good: int | None, newer: list[int], tried: int) -> str:
    """The line a diverged run stops with: what happened, the checkpoint verified to be good
    (or that none is), and what to do."""
    why = (f'{in_a_row} steps in a row up to step {step}' if in_a_row
           else f'{total} step(s) before step {step}')
    if good is None:
        kept = ((f'none of the {tried} checkpoint(s) saved before the trouble began gives '
                 'finite embeddings' if tried else 'no checkpoint was saved before the trouble '
                 'began') + ': start again with a lower optim.lr in a new --workdir')
    else:
        kept = (f'checkpoint {good}, saved before the trouble began, gives finite embeddings on '
                'a training batch and holds the last good state')
        if newer:
            kept += (f' (the newer checkpoints {newer} were written during the trouble: move '
                     'them aside to resume from it)')
        kept += '. Lower optim.lr or raise optim.warmup_steps, then resume from it'
    return (f'training diverged: {why} were not applied (first: {first_reason}; '
            f'train.nonfinite={policy!r}, train.nonfinite_limit={limit}); {kept}')
