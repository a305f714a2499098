"""Model FLOPs from the architecture: what MFU divides by the step time.

XLA's cost analysis counts what the compiled program does: remat's recomputation counts as
work, a scanned stack's body is counted once, and elementwise ops count too. The MFU papers
report (PaLM, maxtext) is the architecture's matmul work instead, the same whatever the memory
levers: every matmul and convolution of both towers and of the similarity matrix, counted as
2 x multiply-adds, forward once and backward twice (gradients of the activations and of the
weights), so a trained forward counts 3 x. Elementwise work (LayerNorm, softmax, GELU,
BatchNorm, pooling) is not counted; XLA counts it, which is most of the gap between the two on
a CPU (tests/test_flops.py measures it).

Attention counts its full (tokens x tokens) score and value matmuls, causal or not (XLA's
attention computes the masked half too). A teacher forward (psd.teacher 'second_pass' or
'ema') is useful work of the step and counted, once, without a backward; it is also reported
on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def transformer(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one sequence of `tokens` through `depth` pre-LN blocks: the qkv,
    output and two MLP projections, and the (tokens x tokens) scores and weighted values."""
    hidden = int(width * mlp_ratio)
    projections = 2 * tokens * width * (3 * width + width + 2 * hidden)
    attention = 2 * 2 * tokens * tokens * width
    return depth * float(projections + attention)


def vit(image_size: int, patch_size: int, width: int, depth: int, embed_dim: int,
        mlp_ratio: float = 4.0, pool: str = 'token', patch_dropout: float = 0.0,
        **_: Any) -> float:
    """Forward FLOPs of one image through a ViT tower: patch embedding (a convolution over
    every patch), the transformer over the tokens kept by patch dropout, the projection."""
    patches = (image_size // patch_size) ** 2
    kept = max(1, round(patches * (1.0 - patch_dropout))) if patch_dropout else patches
    tokens = kept + (1 if pool == 'token' else 0)
    embed = 2 * patches * patch_size * patch_size * 3 * width
    return embed + transformer(tokens, width, depth, mlp_ratio) + 2 * width * embed_dim


def _conv(size: int, kernel: int, c_in: int, c_out: int) -> float:
    return 2.0 * size * size * kernel * kernel * c_in * c_out


def resnet(image_size: int, layers: tuple[int, ...], width: int, embed_dim: int,
           **_: Any) -> float:
    """Forward FLOPs of one image through CLIP's modified ResNet: the 3-convolution stem,
    the bottleneck blocks (anti-aliased: a strided block's 3x3 runs at the input resolution,
    its last 1x1 and shortcut after the pool) and the attention pool (one query token)."""
    size = image_size // 2
    total = (_conv(size, 3, 3, width // 2) + _conv(size, 3, width // 2, width // 2)
             + _conv(size, 3, width // 2, width))
    size //= 2
    channels = width
    for stage, blocks in enumerate(layers):
        planes = width * 2 ** stage
        for i in range(blocks):
            stride = 2 if (stage > 0 and i == 0) else 1
            total += _conv(size, 1, channels, planes) + _conv(size, 3, planes, planes)
            out = size // stride
            total += _conv(out, 1, planes, 4 * planes)
            if stride > 1 or channels != 4 * planes:
                total += _conv(out, 1, channels, 4 * planes)
            size, channels = out, 4 * planes
    tokens = size * size + 1
    c = channels
    pool = 2 * c * c + 2 * 2 * tokens * c * c + 2 * 2 * tokens * c + 2 * c * embed_dim
    return total + pool


def text(context_length: int, text_width: int, text_depth: int, embed_dim: int,
         mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one caption: the causal transformer over the whole context (padding
    included, as computed) and the projection; the embedding lookup is a gather."""
    return (transformer(context_length, text_width, text_depth, mlp_ratio)
            + 2 * text_width * embed_dim)


def image_tower(spec, patch_dropout: float = 0.0) -> float:
    """Forward FLOPs per image of a ModelSpec's image tower."""
    fields = dict(spec.image)
    kind = fields.pop('kind')
    if kind == 'vit':
        return vit(spec.image_size, embed_dim=spec.embed_dim, patch_dropout=patch_dropout,
                   **fields)
    if kind == 'resnet':
        return resnet(spec.image_size, embed_dim=spec.embed_dim, **fields)
    raise ValueError(f'model image kind={kind!r} is not known; allowed: [\'resnet\', \'vit\']')


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one training step (the whole global batch). `train`: both towers
    forward and backward plus the similarity matrix's three matmuls; `teacher`: the teacher's
    forward (0 without one); `total`: what MFU counts."""
    image_forward: float   # per image
    text_forward: float    # per caption
    train: float
    teacher: float

    @property
    def total(self) -> float:
        return self.train + self.teacher

    def as_dict(self) -> dict:
        return {'image_forward': self.image_forward, 'text_forward': self.text_forward,
                'train': self.train, 'teacher': self.teacher, 'total': self.total}


def step(spec, global_batch: int, teacher_rows: int = 0, patch_dropout: float = 0.0
         ) -> StepFlops:
    """Model FLOPs of a step at `global_batch` pairs, with a teacher forward over
    `teacher_rows` pairs (its similarity rows against the whole batch included)."""
    image = image_tower(spec, patch_dropout)
    caption = text(spec.context_length, spec.text_width, spec.text_depth, spec.embed_dim)
    similarity = 2.0 * global_batch * global_batch * spec.embed_dim
    train = 3 * (global_batch * (image + caption) + similarity)
    teacher = 0.0
    if teacher_rows:
        teacher = (teacher_rows * (image_tower(spec) + caption)
                   + 2.0 * teacher_rows * global_batch * spec.embed_dim)
    return StepFlops(image, caption, train, teacher)


def from_config(config: Mapping | Any) -> StepFlops:
    """The step's model FLOPs for a run config (its model, global batch, patch dropout and
    PSD teacher)."""
    from psd_jax import config as config_lib
    from psd_jax.losses import subset_size
    spec = config_lib.model_spec(config)
    batch = int(config.data.global_batch)
    loss = config_lib.loss_config(config)
    rows = subset_size(batch, loss.subset_fraction) if loss.needs_teacher_forward else 0
    return step(spec, batch, rows, float(config.model.patch_dropout))
