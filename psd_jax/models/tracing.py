"""What the models learn about the step being traced: where activations' batch dimension
lives (set by psd_jax.sharding.activation_rules, read by the transformer blocks)."""

from __future__ import annotations

import contextvars

import jax

# Where activations' batch dimension lives, set while tracing by
# psd_jax.sharding.activation_rules (a NamedSharding over the data axes; None: no constraint).
ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar('activation_sharding',
                                                                     default=None)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keep x's leading (batch) dimension split as ACTIVATION_SHARDING says, if set."""
    sharding = ACTIVATION_SHARDING.get()
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

