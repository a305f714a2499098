"""Transformer building blocks shared by the ViT image tower and the text tower.

Every parameter is created through `nn.with_logical_partitioning`, so the sharding rules in
`psd_jax.sharding` can place it without the models knowing anything about meshes. Parameters are
float32; the compute dtype is a module attribute (float32 or bfloat16).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LN_EPSILON = 1e-5  # CLIP's LayerNorm epsilon (PyTorch default).


def normal(stddev: float, axes: tuple[str | None, ...]) -> Callable:
    """A normal initializer carrying logical axis names (`axes`, one per dimension)."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def zeros(axes: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones(axes: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the `embed` axis with CLIP's epsilon; statistics are computed in float32."""
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32,
                        scale_init=ones(('embed',)), bias_init=zeros(('embed',)), name=name)


def quick_gelu(x: jax.Array) -> jax.Array:
    """The activation of the original CLIP models: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {'quick_gelu': quick_gelu, 'gelu': nn.gelu, 'relu': nn.relu}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f'activation={name!r} is not known; allowed: {sorted(ACTIVATIONS)}')
    return ACTIVATIONS[name]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, as in CLIP (in_proj with bias).

    x: (batch, tokens, width) -> (batch, tokens, width). `causal` applies the text tower's mask.
    """
    heads: int
    causal: bool = False
    in_std: float = 0.02
    out_std: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f'width {width} does not divide into heads={self.heads}')
        head_dim = width // self.heads
        qkv = nn.DenseGeneral(
            features=(3, self.heads, head_dim), dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=normal(self.in_std, ('embed', None, 'heads', 'kv')),
            bias_init=zeros((None, 'heads', 'kv')), name='qkv')(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return nn.DenseGeneral(
            features=width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=normal(self.out_std, ('heads', 'kv', 'embed')),
            bias_init=zeros(('embed',)), name='out')(y)


class MLP(nn.Module):
    """The transformer feed-forward block: Dense(width * ratio) -> activation -> Dense(width)."""
    mlp_ratio: float = 4.0
    act: str = 'quick_gelu'
    fc_std: float = 0.02
    proj_std: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        hidden = int(width * self.mlp_ratio)
        h = nn.Dense(hidden, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=normal(self.fc_std, ('embed', 'mlp')),
                     bias_init=zeros(('mlp',)), name='fc')(x)
        h = activation(self.act)(h)
        return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=normal(self.proj_std, ('mlp', 'embed')),
                        bias_init=zeros(('embed',)), name='proj')(h)


class Transformer(nn.Module):
    """A stack of pre-LayerNorm residual blocks with CLIP's initialisation.

    x: (batch, tokens, width) -> (batch, tokens, width).
    """
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = 'quick_gelu'
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * self.depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        for i in range(self.depth):
            h = layer_norm(self.dtype, name=f'block{i}_ln1')(x)
            x = x + SelfAttention(self.heads, self.causal, attn_std, proj_std, self.dtype,
                                  name=f'block{i}_attn')(h)
            h = layer_norm(self.dtype, name=f'block{i}_ln2')(x)
            x = x + MLP(self.mlp_ratio, self.act, fc_std, proj_std, self.dtype,
                        name=f'block{i}_mlp')(h)
        return x
