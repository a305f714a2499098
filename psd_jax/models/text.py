"""The CLIP text transformer: tokens + learned positions -> causal transformer -> EOT feature."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from psd_jax.models.layers import Dtype, Transformer, layer_norm, normal

POOLS = ('argmax', 'last')


class TextTransformer(nn.Module):
    """tokens (batch, context_length) int -> embeddings (batch, embed_dim), not yet normalised.

    The feature is read at the end-of-text token. `pool='argmax'` finds it as the largest token id
    (CLIP's BPE, where end-of-text has the largest id); `pool='last'` takes the last non-padding
    token (padding id 0), which suits tokenizers whose end-of-sequence id is not the largest.
    """
    vocab_size: int
    context_length: int
    width: int
    depth: int
    heads: int
    embed_dim: int
    mlp_ratio: float = 4.0
    pool: str = 'argmax'
    act: str = 'quick_gelu'
    dtype: Dtype = jnp.float32
    remat: str = 'none'  # layers.REMAT_POLICIES
    scan_layers: bool = False
    attention: str = 'xla'  # layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.pool not in POOLS:
            raise ValueError(f'pool={self.pool!r} is not known; allowed: {list(POOLS)}')
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f'tokens have shape {tokens.shape}, the model expects '
                             f'(batch, {self.context_length})')
        embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                         embedding_init=normal(0.02, ('vocab', 'embed')), name='token_embedding')
        x = embed(tokens)
        pos = self.param('positional_embedding', normal(0.01, (None, 'embed')),
                         (self.context_length, self.width))
        x = x + pos.astype(self.dtype)
        x = Transformer(self.depth, self.heads, self.mlp_ratio, self.act, causal=True,
                        dtype=self.dtype, remat=self.remat, scan_layers=self.scan_layers,
                        attention=self.attention,
                        name='transformer')(x)
        x = layer_norm(self.dtype, name='ln_final')(x)
        if self.pool == 'argmax':
            eot = jnp.argmax(tokens, axis=-1)
        else:
            eot = jnp.maximum(jnp.sum(tokens != 0, axis=-1) - 1, 0)
        feature = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        proj = self.param('text_projection', normal(self.width ** -0.5, ('embed', 'joint')),
                          (self.width, self.embed_dim))
        return feature @ proj.astype(self.dtype)
