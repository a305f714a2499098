"""The two-tower dual encoder: image tower + text tower + the learnable logit scale."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The one definition of the logit-scale cap (CLIP's: t = exp(logit_scale) <= 100) and of the
# initial values; the loss and the train step use the functions below.
MAX_LOGIT_SCALE = 100.0
LOG_MAX_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # t = 1 / 0.07 (CLIP)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # t = 10 (SigLIP)
SIGLIP_INIT_LOGIT_BIAS = -10.0


# CLIP's pixel statistics (RGB, on [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(images: jax.Array) -> jax.Array:
    """uint8 RGB pixels (..., 3) -> float32 with CLIP's mean and std, on the device: the input
    pipeline ships uint8 (a quarter of float32's bytes per step from host to device)."""
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Unit-normalise the last axis in float32 (embeddings enter the loss in float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def logit_scale_value(logit_scale: jax.Array) -> jax.Array:
    """t = exp(logit_scale) in float32, never above MAX_LOGIT_SCALE (CLIP's clip): the scale
    every loss and metric uses. logit_scale: the raw scalar parameter."""
    return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), LOG_MAX_LOGIT_SCALE))


def clip_logit_scale(logit_scale: jax.Array) -> jax.Array:
    """The raw parameter clipped to [0, log MAX_LOGIT_SCALE] after each update (t in [1, 100]),
    so the optimiser cannot push it past the cap where its gradient would vanish."""
    return jnp.clip(logit_scale, 0.0, LOG_MAX_LOGIT_SCALE)


class DualEncoder(nn.Module):
    """CLIP-style dual encoder.

    `__call__(images (B,H,W,3), tokens (B,L))` returns L2-normalised image embeddings (B, D),
    text embeddings (B, D) and the raw `logit_scale` parameter (a scalar; the loss applies
    `logit_scale_value`). `logit_bias` exists only when `init_logit_bias` is set (sigmoid loss).
    """
    image_tower: nn.Module
    text_tower: nn.Module
    init_logit_scale: float = CLIP_INIT_LOGIT_SCALE
    init_logit_bias: float | None = None

    def setup(self):
        self.logit_scale = self.param(
            'logit_scale', nn.with_logical_partitioning(
                nn.initializers.constant(self.init_logit_scale), ()), ())
        if self.init_logit_bias is not None:
            self.logit_bias = self.param(
                'logit_bias', nn.with_logical_partitioning(
                    nn.initializers.constant(self.init_logit_bias), ()), ())

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(B,H,W,3) -> (B,D) unit-norm float32. images: uint8 pixels (normalised here, as the
        pipeline sends them) or floats already CLIP-normalised."""
        if images.dtype == jnp.uint8:
            images = normalize_pixels(images)
        return l2_normalize(self.image_tower(images, train=train))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """(B,L) int -> (B,D) unit-norm float32."""
        return l2_normalize(self.text_tower(tokens))

    def __call__(self, images: jax.Array, tokens: jax.Array,
                 train: bool = False) -> dict[str, Any]:
        out = {'image': self.encode_image(images, train), 'text': self.encode_text(tokens),
               'logit_scale': self.logit_scale}
        if self.init_logit_bias is not None:
            out['logit_bias'] = self.logit_bias
        return out
