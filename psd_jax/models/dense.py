"""A dense layer whose weight gradient transposes the narrower operand (CPU).

The weight gradient of y = x @ w over n rows is x^T @ dy, a product whose contraction runs over
the rows of both operands. XLA's CPU matmul kernels want the contracted dimension minor in the
left operand, so one operand is transposed in memory first, and XLA often picks the wider one
(dy of an MLP's hidden layer, 4x the width of x). Transposing the narrower operand explicitly
(an optimization barrier keeps XLA from folding it back) moves less memory. On other platforms
(GPUs, TPUs) the matmul units take either operand transposed for free, and the plain product
is used. The choice is made while tracing, for the platform the step is compiled for
(models/tracing.py: a TPU step compiled ahead of time on a CPU machine gets the plain form).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from psd_jax.models.tracing import target_platform


def _weight_grad_cpu(x: jax.Array, dy: jax.Array) -> jax.Array:
    if x.shape[1] <= dy.shape[1]:
        xt = jax.lax.optimization_barrier(x.T)
        return xt @ dy
    dyt = jax.lax.optimization_barrier(dy.T)
    return (dyt @ x).T


def _weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    if target_platform() == 'cpu':
        return _weight_grad_cpu(x, dy)
    return x.T @ dy


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (n, k) @ w (k, m) -> (n, m), with the weight gradient above."""
    return x @ w


def _forward(x, w):
    return x @ w, (x, w)


def _backward(residuals, dy):
    x, w = residuals
    return dy @ w.T, _weight_grad(x, dy).astype(w.dtype)


matmul.defvjp(_forward, _backward)


class Dense(nn.Module):
    """y = x @ kernel + bias over x's last `in_axes` dimensions (flax's Dense / DenseGeneral
    parameters: kernel (*in_shape, *features), bias (*features)). x: (..., *in_shape) ->
    (..., *features) in `dtype`; parameters float32."""
    features: tuple[int, ...]
    in_axes: int = 1
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_axes:]
        batch_shape = x.shape[:x.ndim - self.in_axes]
        kernel = self.param('kernel', self.kernel_init, (*in_shape, *self.features), jnp.float32)
        bias = self.param('bias', self.bias_init, self.features, jnp.float32)
        k, m = math.prod(in_shape), math.prod(self.features)
        rows = x.reshape(-1, k).astype(self.dtype)
        y = matmul(rows, kernel.reshape(k, m).astype(self.dtype)) + bias.reshape(m).astype(
            self.dtype)
        return y.reshape(*batch_shape, *self.features)
