"""The transformer's dense layer: one two-dimensional matmul over flattened rows.

flax's DenseGeneral gives the same values and parameters, but it contracts x's last `in_axes`
dimensions against the kernel as they are, and the attention's fused qkv (features
(3, heads, head_dim)) and output projection (in_axes 2) then reach XLA as multi-dimensional
dot_generals. On a TPU, XLA keeps more of them for the backward pass: the ViT-B/32 PSD step
on v4-32 needs more memory per device with flax's layer than with this one
(benchmarks/layers_tpu.py; docs/performance.md). Here x is reshaped to (rows, k) and the
kernel to (k, m), so every weight matmul is a plain (rows, k) @ (k, m) product, differentiated
automatically on every platform.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


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
        y = rows @ kernel.reshape(k, m).astype(self.dtype) + bias.reshape(m).astype(self.dtype)
        return y.reshape(*batch_shape, *self.features)
