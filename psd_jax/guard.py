"""The non-finite guard: a step whose loss, gradient norm or updated parameters are not finite is
not applied, and a run that keeps producing such steps stops with its last good checkpoint.

On the device (`keep_if_finite`, inside the jitted step, a few scalar reductions): the new
state replaces the old one only when the step is finite; otherwise everything but the step
counter stays as it was, and the state's `health` counts the skip. On the host
(`check_health`, at log steps, before each checkpoint and at the end): `train.nonfinite='stop'`
stops at the first skipped step, `'skip'` after `train.nonfinite_limit` skips in a row.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

POLICIES = ('skip', 'stop')


class TrainingDiverged(RuntimeError):
    """The run produced non-finite steps beyond what its config tolerates."""


def initial_health() -> dict[str, jax.Array]:
    """{'skipped_in_a_row', 'skipped_total'}: int32 counters kept in the train state."""
    return {'skipped_in_a_row': jnp.zeros((), jnp.int32),
            'skipped_total': jnp.zeros((), jnp.int32)}


def keep_if_finite(new_state: Any, old_state: Any, loss: jax.Array,
                   grad_norm: jax.Array) -> tuple[Any, jax.Array]:
    """`new_state` if the step is finite, else `old_state` with its step counter advanced;
    either way with `health` updated. Returns (state, finite: bool scalar). The states are
    TrainStates of one structure; the RNG key (unchanged by a step) is carried over as is."""
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(new_state.params)))
    kept = old_state.replace(step=new_state.step)
    rng = new_state.rng
    merged = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state.replace(rng=None),
                          kept.replace(rng=None))
    health = old_state.health
    health = {'skipped_in_a_row': jnp.where(finite, 0, health['skipped_in_a_row'] + 1),
              'skipped_total': health['skipped_total'] + (~finite).astype(jnp.int32)}
    return merged.replace(rng=rng, health=health), finite


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
        f'training diverged: {why} had a non-finite loss, gradient norm or update and were not '
        f'applied (train.nonfinite={policy!r}, train.nonfinite_limit={limit}); {kept}. '
        'Lower optim.lr or raise optim.warmup_steps, then resume from that checkpoint.')
