"""The non-finite guard: a step whose loss or gradient norm is not finite is not applied, and a
run that keeps producing such steps stops with its last good checkpoint.

On the device (`is_finite` and `count_skips`, inside the jitted step: two scalar checks and a
`lax.cond` around the optimizer update, so a finite step costs no extra pass over the state):
the update is applied only when the step is finite; otherwise everything but the step counter
stays as it was, and the state's `health` counts the skip. On the host
(`check_health`, at log steps, before each checkpoint and at the end): `train.nonfinite='stop'`
stops at the first skipped step, `'skip'` after `train.nonfinite_limit` skips in a row.
"""

from __future__ import annotations


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


def count_skips(health: dict[str, jax.Array], finite: jax.Array) -> dict[str, jax.Array]:
    """The state's counters after a step that was applied (`finite`) or skipped."""
    return {'skipped_in_a_row': jnp.where(finite, 0, health['skipped_in_a_row'] + 1),
            'skipped_total': health['skipped_total'] + (~finite).astype(jnp.int32)}


def check_health(health: dict, policy: str, limit: int, step: int,
                 last_checkpoint: int | None) -> None:
    """Raise TrainingDiverged when `health` (host values of the state's counters) exceeds the
    policy; the message names the step and the checkpoint that is still good."""
    in_a_row, total = int(health['skipped_in_a_row']), int(health['skipped_total'])
    if total == 0 or (policy == 'skip' and in_a_row < limit):
        return
    kept = ('no checkpoint was written before it' if last_checkpoint is None
            else f'the last checkpoint (step {last_checkpoint}) holds the last good state')
    why = (f'{in_a_row} steps in a row up to step {step}' if in_a_row
           else f'{total} step(s) before step {step}')
    raise TrainingDiverged(
        f'training diverged: {why} had a non-finite loss or gradient norm and were not '
        f'applied (train.nonfinite={policy!r}, train.nonfinite_limit={limit}); {kept}. '
        'Lower optim.lr or raise optim.warmup_steps, then resume from that checkpoint.')
