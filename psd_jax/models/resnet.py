"""CLIP's modified ResNet image tower (RN50 family).

Differences from a torchvision ResNet, all kept: a 3-convolution stem with an average pool instead
of a max pool; anti-aliased strided blocks (stride by an average pool after the 3x3 convolution,
and an average pool before the 1x1 shortcut convolution); an attention-pooling head in place of
global average pooling. BatchNorm scale/bias are parameters; running statistics live in the
`batch_stats` collection.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from psd_jax.models.layers import REMAT_POLICIES, Dtype, check_remat, normal, ones, zeros

BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
BN_EPSILON = 1e-5


def _avg_pool(x: jax.Array, stride: int) -> jax.Array:
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class ConvBN(nn.Module):
    """Bias-free convolution followed by BatchNorm (optionally zero-initialised scale)."""
    features: int
    kernel: int = 1
    stride: int = 1
    zero_scale: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        fan_in = self.kernel * self.kernel * x.shape[-1]
        x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                    padding=[(self.kernel // 2, self.kernel // 2)] * 2, use_bias=False,
                    dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=normal((2.0 / fan_in) ** 0.5, (None, None, None, 'conv_out')),
                    name='conv')(x)
        scale_init = zeros(('conv_out',)) if self.zero_scale else ones(('conv_out',))
        return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                            epsilon=BN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                            scale_init=scale_init, bias_init=zeros(('conv_out',)),
                            name='bn')(x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> [avg pool stride] -> 1x1 (x4 channels), with an anti-aliased shortcut."""
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_ch = self.planes * 4
        h = nn.relu(ConvBN(self.planes, 1, dtype=self.dtype, name='conv1')(x, train))
        h = nn.relu(ConvBN(self.planes, 3, dtype=self.dtype, name='conv2')(h, train))
        h = _avg_pool(h, self.stride)
        h = ConvBN(out_ch, 1, zero_scale=True, dtype=self.dtype, name='conv3')(h, train)
        if self.stride > 1 or x.shape[-1] != out_ch:
            x = ConvBN(out_ch, 1, dtype=self.dtype, name='downsample')(
                _avg_pool(x, self.stride), train)
        return nn.relu(h + x)


class AttentionPool(nn.Module):
    """Attention pooling: the mean token (plus positions) attends to all spatial tokens.

    x: (batch, h, w, channels) -> (batch, output_dim).
    """
    heads: int
    output_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c % self.heads:
            raise ValueError(f'attention-pool width {c} does not divide into heads={self.heads}')
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        pos = self.param('positional_embedding', normal(c ** -0.5, (None, 'embed')),
                         (h * w + 1, c))
        x = x + pos.astype(self.dtype)
        std = c ** -0.5

        def proj(name: str, features, axes_in, axes_out, inp, axis=-1):
            return nn.DenseGeneral(features, axis=axis, dtype=self.dtype, param_dtype=jnp.float32,
                                   kernel_init=normal(std, axes_in + axes_out),
                                   bias_init=zeros(axes_out), name=name)(inp)

        head_dim = c // self.heads
        q = proj('q_proj', (self.heads, head_dim), ('embed',), ('heads', 'kv'), x[:, :1])
        k = proj('k_proj', (self.heads, head_dim), ('embed',), ('heads', 'kv'), x)
        v = proj('v_proj', (self.heads, head_dim), ('embed',), ('heads', 'kv'), x)
        y = jax.nn.dot_product_attention(q, k, v)
        y = proj('c_proj', self.output_dim, ('heads', 'kv'), ('joint',), y, axis=(-2, -1))
        return y[:, 0]


class ModifiedResNet(nn.Module):
    """images (batch, H, W, 3) -> embeddings (batch, embed_dim), not yet normalised.

    `remat` (layers.REMAT_POLICIES) wraps each bottleneck block in `jax.checkpoint`: 'full'
    keeps only the block's input for the backward pass and recomputes the rest. 'minimal'
    saves the weight matmuls' outputs, and a ResNet block has none (its weights are
    convolutions), so it keeps what 'full' keeps. The running BatchNorm statistics are
    updated once, by the forward pass; the values never change.
    """
    image_size: int
    layers: Sequence[int]
    width: int
    heads: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    remat: str = 'none'

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.image_size % 32:
            raise ValueError(f'image_size={self.image_size} must be a multiple of 32 for a ResNet')
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f'images have spatial shape {images.shape[1:3]}, the model expects '
                             f'{(self.image_size, self.image_size)}')
        x = images.astype(self.dtype)
        x = nn.relu(ConvBN(self.width // 2, 3, stride=2, dtype=self.dtype, name='stem1')(x, train))
        x = nn.relu(ConvBN(self.width // 2, 3, dtype=self.dtype, name='stem2')(x, train))
        x = nn.relu(ConvBN(self.width, 3, dtype=self.dtype, name='stem3')(x, train))
        x = _avg_pool(x, 2)
        check_remat(self.remat)
        block = Bottleneck
        if self.remat != 'none':  # argument 2 (`train`, counting self) is a Python bool
            block = nn.remat(Bottleneck, policy=REMAT_POLICIES[self.remat], static_argnums=(2,))
        for stage, blocks in enumerate(self.layers):
            planes = self.width * 2 ** stage
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                x = block(planes, stride, self.dtype, name=f'layer{stage + 1}_{i}')(x, train)
        return AttentionPool(self.heads, self.embed_dim, self.dtype, name='attnpool')(x)
