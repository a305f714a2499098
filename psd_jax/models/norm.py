"""LayerNorm with a hand-written backward pass.

Automatic differentiation of a layer norm keeps several (tokens, width) intermediates and
builds its backward from a dozen elementwise passes and reductions; XLA's CPU backend fuses
them poorly (broadcasts of the scale materialised, one fusion per reduction). The closed form
needs only the input, the per-token mean and reciprocal standard deviation:

    xhat = (x - mean) * rstd,   y = xhat * scale + bias
    g = dy * scale
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dscale = sum over tokens of dy * xhat,   dbias = sum over tokens of dy

Statistics and the backward run in float32 whatever the compute dtype (as flax's LayerNorm
does); y and dx come back in the input's dtype. Same values as flax.linen.LayerNorm (tested).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _stats(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    return centred * rstd, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """Normalises x (..., width) over its last axis; scale, bias: (width,) float32.
    Returns (..., width) in x's dtype."""
    return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
    xhat, mean, rstd = _stats(x, epsilon)
    return (xhat * scale + bias).astype(x.dtype), (x, mean, rstd, scale)


def _backward(epsilon, residuals, dy):
    x, mean, rstd, scale = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dy = dy.astype(jnp.float32)
    g = dy * scale
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
                 - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    return (dx.astype(x.dtype), jnp.sum(dy * xhat, axis=rows), jnp.sum(dy, axis=rows))


layer_norm.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
    """flax.linen.LayerNorm's parameters (`scale`, `bias`) and values with the closed-form
    backward above. x: (..., width) -> (..., width) in `dtype`."""
    epsilon: float
    dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones_init()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param('scale', self.scale_init, (width,), jnp.float32)
        bias = self.param('bias', self.bias_init, (width,), jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)
