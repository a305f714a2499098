"""What the models learn about the step being traced: where activations live and which
platform the step is compiled for (set by psd_jax.sharding.activation_rules)."""

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


def target_platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the mesh the step is traced for, else JAX's
    default backend. A TPU step compiled ahead of time on a CPU machine (compile_check) is
    traced for 'tpu'."""
    sharding = ACTIVATION_SHARDING.get()
    if sharding is not None:
        return sharding.mesh.devices.flat[0].platform
    return jax.default_backend()
