"""The contrastive losses over a sharded similarity matrix: CLIP, Progressive Self-Distillation
(PSD) soft targets and sigmoid, each in two implementations (`loss.impl`): `all_gather`
(b x B slabs per device) and `ring` (b x t tiles, the other modality circulating). The
formulas, gradients and sharding are in docs/design.md ("The losses", "Sharding the
similarity matrix").

- config.py: LossConfig (what the loss is), Teacher, the per-step subset;
- sharded.py: psd_loss, clip_loss, sigmoid_loss inside `jax.shard_map`;
- ring.py: the ring's running reductions and its custom VJP;
- matmul.py: the similarity matmuls at loss.precision.
"""

from psd_jax.losses.config import (DIAGONAL_MODES, LOSS_IMPLS, LOSS_KINDS, TEACHERS, LossConfig,
                                   Teacher, check_fraction, subset_indices, subset_mask,
                                   subset_size)
from psd_jax.losses.sharded import clip_loss, psd_loss, sigmoid_loss

__all__ = ['DIAGONAL_MODES', 'LOSS_IMPLS', 'LOSS_KINDS', 'TEACHERS', 'LossConfig', 'Teacher',
           'check_fraction', 'clip_loss', 'psd_loss', 'sigmoid_loss', 'subset_indices',
           'subset_mask', 'subset_size']
