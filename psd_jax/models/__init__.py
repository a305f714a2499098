"""Model presets and the factory that builds a `DualEncoder` from a name or a config.

Presets match OpenAI CLIP's architectures (224 px, context 77, vocabulary 49,408), so their
trainable-parameter counts equal the published ones (pinned by tests/test_models.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from psd_jax.models.clip import (SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, DualEncoder,
                                 l2_normalize, logit_scale_value)
from psd_jax.models.layers import check_attention, check_remat
from psd_jax.models.resnet import ModifiedResNet
from psd_jax.models.text import TextTransformer
from psd_jax.models.vit import VisionTransformer

__all__ = ['DualEncoder', 'ModelSpec', 'PRESETS', 'build_model', 'l2_normalize',
           'logit_scale_value', 'preset']

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a dual encoder; `image` holds the image tower's own fields."""
    embed_dim: int
    image_size: int
    image: Mapping[str, Any]  # {'kind': 'vit'|'resnet', ...tower fields}
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_pool: str = 'argmax'
    act: str = 'quick_gelu'


PRESETS: dict[str, ModelSpec] = {
    'tiny': ModelSpec(embed_dim=32, image_size=32, vocab_size=1000, context_length=16,
                      text_width=32, text_depth=2, text_heads=2,
                      image=dict(kind='vit', patch_size=8, width=32, depth=2, heads=2)),
    'ViT-B/32': ModelSpec(embed_dim=512, image_size=224,
                          image=dict(kind='vit', patch_size=32, width=768, depth=12, heads=12)),
    'ViT-B/16': ModelSpec(embed_dim=512, image_size=224,
                          image=dict(kind='vit', patch_size=16, width=768, depth=12, heads=12)),
    # open_clip's ViT-S-16 (a small model for single-GPU studies)
    'ViT-S/16': ModelSpec(embed_dim=384, image_size=224, text_width=384, text_heads=6,
                          image=dict(kind='vit', patch_size=16, width=384, depth=12, heads=6)),
    'ViT-L/14': ModelSpec(embed_dim=768, image_size=224, text_width=768, text_heads=12,
                          image=dict(kind='vit', patch_size=14, width=1024, depth=24, heads=16)),
    'RN50': ModelSpec(embed_dim=1024, image_size=224,
                      image=dict(kind='resnet', layers=(3, 4, 6, 3), width=64, heads=32)),
}


def preset(name: str, **overrides: Any) -> ModelSpec:
    """A named preset, with top-level fields replaced by `overrides` (e.g. image_size=64)."""
    if name not in PRESETS:
        raise ValueError(f'model preset {name!r} is not known; allowed: {sorted(PRESETS)}')
    return dataclasses.replace(PRESETS[name], **overrides)


def build_model(spec: ModelSpec | str, dtype: str = 'float32', sigmoid: bool = False,
                remat: str = 'none', scan_layers: bool = False,
                patch_dropout: float = 0.0, attention: str = 'xla') -> DualEncoder:
    """A `DualEncoder` computing in `dtype` ('float32' or 'bfloat16') with float32 parameters;
    `sigmoid`: SigLIP's initial scale (t = 10) and a logit bias (-10), else CLIP's t = 1/0.07.
    `remat` (none | minimal | full) applies to every transformer stack and to the bottleneck
    blocks of a ResNet, `scan_layers` to the transformer stacks: memory levers that leave the
    values alone; `scan_layers` stacks the block parameters
    (psd_jax/persistence/layout.py converts)."""
    if isinstance(spec, str):
        spec = preset(spec)
    if dtype not in DTYPES:
        raise ValueError(f'model dtype={dtype!r} is not known; allowed: {sorted(DTYPES)}')
    check_remat(remat)
    compute = DTYPES[dtype]
    check_attention(attention, compute)
    levers = {'remat': remat, 'scan_layers': scan_layers, 'attention': attention}
    image = dict(spec.image)
    kind = image.pop('kind', None)
    if kind == 'vit':
        tower = VisionTransformer(image_size=spec.image_size, embed_dim=spec.embed_dim,
                                  act=spec.act, dtype=compute, patch_dropout=patch_dropout,
                                  **levers, **image)
    elif kind == 'resnet':
        if patch_dropout:
            raise ValueError(f'model.patch_dropout={patch_dropout}: a ResNet image tower has no '
                             'patches to drop; use a ViT preset or 0')
        tower = ModifiedResNet(image_size=spec.image_size, embed_dim=spec.embed_dim,
                               dtype=compute, remat=remat, **image)
    else:
        raise ValueError(f"model image kind={kind!r} is not known; allowed: ['resnet', 'vit']")
    text = TextTransformer(vocab_size=spec.vocab_size, context_length=spec.context_length,
                           width=spec.text_width, depth=spec.text_depth, heads=spec.text_heads,
                           embed_dim=spec.embed_dim, pool=spec.text_pool, act=spec.act,
                           dtype=compute, **levers)
    if sigmoid:
        return DualEncoder(image_tower=tower, text_tower=text,
                           init_logit_scale=SIGLIP_INIT_LOGIT_SCALE,
                           init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)
    return DualEncoder(image_tower=tower, text_tower=text)
