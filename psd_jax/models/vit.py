"""The ViT image tower of CLIP: patchify -> [class token] + positions -> transformer -> project."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from psd_jax.models.layers import Dtype, Transformer, layer_norm, normal

POOLS = ('token', 'mean')


class VisionTransformer(nn.Module):
    """images (batch, H, W, 3) -> embeddings (batch, embed_dim), not yet normalised.

    `pool='token'` reads the class token (CLIP); `pool='mean'` averages the patch tokens and has no
    class token. The projection to the shared space has no bias, as in CLIP.
    """
    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    embed_dim: int
    mlp_ratio: float = 4.0
    pool: str = 'token'
    act: str = 'quick_gelu'
    dtype: Dtype = jnp.float32
    remat: str = 'none'  # layers.REMAT_POLICIES
    scan_layers: bool = False
    attention: str = 'xla'  # layers.ATTENTION_IMPLS
    patch_dropout: float = 0.0  # fraction of patch tokens dropped in training (FLIP)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.pool not in POOLS:
            raise ValueError(f'pool={self.pool!r} is not known; allowed: {list(POOLS)}')
        if self.image_size % self.patch_size:
            raise ValueError(f'image_size={self.image_size} is not a multiple of '
                             f'patch_size={self.patch_size}')
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f'images have spatial shape {images.shape[1:3]}, the model expects '
                             f'{(self.image_size, self.image_size)}')
        scale = self.width ** -0.5
        x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                    padding='VALID', use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=normal(0.02, (None, None, None, 'embed')),
                    name='patch_embed')(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, self.width)
        if self.pool == 'token':
            cls = self.param('class_embedding', normal(scale, ('embed',)), (self.width,))
            cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        pos = self.param('positional_embedding', normal(scale, (None, 'embed')),
                         (x.shape[1], self.width))
        x = x + pos.astype(self.dtype)
        if train and self.patch_dropout > 0:
            x = self._drop_patches(x)
        x = layer_norm(self.dtype, name='ln_pre')(x)
        x = Transformer(self.depth, self.heads, self.mlp_ratio, self.act, causal=False,
                        dtype=self.dtype, remat=self.remat, scan_layers=self.scan_layers,
                        attention=self.attention,
                        name='transformer')(x)
        pooled = x[:, 0] if self.pool == 'token' else x.mean(axis=1)
        pooled = layer_norm(self.dtype, name='ln_post')(pooled)
        proj = self.param('proj', normal(scale, ('embed', 'joint')), (self.width, self.embed_dim))
        return pooled @ proj.astype(self.dtype)

    def _drop_patches(self, x: jax.Array) -> jax.Array:
        """Keep a random round((1 - patch_dropout) n) of each example's n patch tokens (and
        the class token), after the positions are added: the transformer then runs on fewer
        tokens (FLIP, arXiv 2212.00794). Uses the 'dropout' RNG stream."""
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f'model.patch_dropout={self.patch_dropout} must be in [0, 1)')
        first = 1 if self.pool == 'token' else 0
        patches = x[:, first:]
        keep = max(1, round(patches.shape[1] * (1.0 - self.patch_dropout)))
        noise = jax.random.uniform(self.make_rng('dropout'), patches.shape[:2])
        order = jnp.argsort(noise, axis=1)[:, :keep]
        kept = jnp.take_along_axis(patches, order[:, :, None], axis=1)
        return jnp.concatenate([x[:, :first], kept], axis=1)
