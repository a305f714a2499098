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

from psd_jax.models.dense import Dense
from psd_jax.models.norm import LayerNorm
from psd_jax.models.tracing import constrain_batch

Dtype = Any

LN_EPSILON = 1e-5  # CLIP's LayerNorm epsilon (PyTorch default).


def normal(stddev: float, axes: tuple[str | None, ...]) -> Callable:
    """A normal initializer carrying logical axis names (`axes`, one per dimension)."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def zeros(axes: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones(axes: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.Module:
    """LayerNorm over the `embed` axis with CLIP's epsilon; statistics are computed in float32
    (psd_jax/models/norm.py: flax's LayerNorm with a closed-form backward)."""
    return LayerNorm(epsilon=LN_EPSILON, dtype=dtype,
                     scale_init=ones(('embed',)), bias_init=zeros(('embed',)), name=name)


def quick_gelu(x: jax.Array) -> jax.Array:
    """The activation of the original CLIP models: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's nn.GELU() and open_clip's non-quickgelu models."""
    return nn.gelu(x, approximate=False)


# quick_gelu: OpenAI CLIP's; gelu: exact erf GELU (open_clip's LAION / DataComp models);
# gelu_tanh: the tanh approximation (2e-4 from exact)
ACTIVATIONS = {'quick_gelu': quick_gelu, 'gelu': gelu, 'gelu_tanh': nn.gelu, 'relu': nn.relu}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f'activation={name!r} is not known; allowed: {sorted(ACTIVATIONS)}')
    return ACTIVATIONS[name]


# model.attention: jax.nn.dot_product_attention's implementation. xla: any backend; cudnn:
# cuDNN's fused (flash) attention, NVIDIA GPUs only, float16 / bfloat16.
ATTENTION_IMPLS = {'xla': 'xla', 'cudnn': 'cudnn'}


def check_attention(attention: str, dtype: Any = None) -> None:
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f'model.attention={attention!r} is not known; allowed: '
                         f'{list(ATTENTION_IMPLS)}')
    if attention == 'cudnn' and dtype is not None and jnp.dtype(dtype) == jnp.float32:
        raise ValueError("model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN's fused "
                         'attention takes float16 / bfloat16)')


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, as in CLIP (in_proj with bias).

    x: (batch, tokens, width) -> (batch, tokens, width). `causal` applies the text tower's mask.
    `attention`: an ATTENTION_IMPLS key.
    """
    heads: int
    causal: bool = False
    in_std: float = 0.02
    out_std: float = 0.02
    dtype: Dtype = jnp.float32
    attention: str = 'xla'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f'width {width} does not divide into heads={self.heads}')
        head_dim = width // self.heads
        qkv = Dense(
            features=(3, self.heads, head_dim), dtype=self.dtype,
            kernel_init=normal(self.in_std, ('embed', None, 'heads', 'kv')),
            bias_init=zeros((None, 'heads', 'kv')), name='qkv')(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal,
                                         implementation=ATTENTION_IMPLS[self.attention])
        return Dense(
            features=(width,), in_axes=2, dtype=self.dtype,
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
        h = Dense((hidden,), dtype=self.dtype,
                     kernel_init=normal(self.fc_std, ('embed', 'mlp')),
                     bias_init=zeros(('mlp',)), name='fc')(x)
        h = activation(self.act)(h)
        return Dense((width,), dtype=self.dtype,
                        kernel_init=normal(self.proj_std, ('mlp', 'embed')),
                        bias_init=zeros(('embed',)), name='proj')(h)


# model.remat: what a transformer block keeps for the backward pass (jax.checkpoint policies).
# none: everything; minimal: the weight matmuls' outputs (the rest is recomputed); full: only
# the block's input (the whole block is recomputed in the backward pass).
REMAT_POLICIES = {'none': None,
                  'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  'full': jax.checkpoint_policies.nothing_saveable}


def check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f'model.remat={remat!r} is not known; allowed: {list(REMAT_POLICIES)}')


class Block(nn.Module):
    """One pre-LayerNorm residual block: x + attn(ln1(x)), then + mlp(ln2(.)).

    (x (batch, tokens, width), unused) -> (x, None): the carry signature `nn.scan` wants."""
    heads: int
    mlp_ratio: float
    act: str
    causal: bool
    attn_std: float
    proj_std: float
    fc_std: float
    dtype: Dtype = jnp.float32
    attention: str = 'xla'

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        # keep the batch split inside a scanned stack (else XLA may replicate it in the loop)
        x = constrain_batch(x)
        h = layer_norm(self.dtype, name='ln1')(x)
        x = x + SelfAttention(self.heads, self.causal, self.attn_std, self.proj_std, self.dtype,
                              self.attention, name='attn')(h)
        h = layer_norm(self.dtype, name='ln2')(x)
        x = x + MLP(self.mlp_ratio, self.act, self.fc_std, self.proj_std, self.dtype,
                    name='mlp')(h)
        return x, None


class Transformer(nn.Module):
    """A stack of pre-LayerNorm residual blocks with CLIP's initialisation.

    x: (batch, tokens, width) -> (batch, tokens, width). Parameters live under `block{i}`, or,
    with `scan_layers`, once under `blocks` with a leading (depth,) axis (one block compiled
    and looped: compile time independent of depth; psd_jax/persistence/layout.py converts).
    `remat` names a REMAT_POLICIES entry; it changes memory and compute, never the values.
    """
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = 'quick_gelu'
    causal: bool = False
    dtype: Dtype = jnp.float32
    remat: str = 'none'
    scan_layers: bool = False
    attention: str = 'xla'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_remat(self.remat)
        width = x.shape[-1]
        attn_std = width ** -0.5
        args = (self.heads, self.mlp_ratio, self.act, self.causal, attn_std,
                attn_std * (2 * self.depth) ** -0.5, (2 * width) ** -0.5, self.dtype,
                self.attention)
        block = Block
        if self.remat != 'none':
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat],
                             prevent_cse=not self.scan_layers)
        if self.scan_layers:
            scanned = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                              length=self.depth, metadata_params={nn.PARTITION_NAME: 'layers'})
            return scanned(*args, name='blocks')(x, None)[0]
        for i in range(self.depth):
            x = block(*args, name=f'block{i}')(x, None)[0]
        return x

