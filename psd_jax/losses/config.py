"""What the training loss is (LossConfig, validated, with the defaults base_config reads), the
teacher's embeddings (Teacher) and the per-step random subset that gets soft targets."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from psd_jax.losses.matmul import PRECISIONS

LOSS_KINDS = ('clip', 'psd', 'sigmoid')
LOSS_IMPLS = ('all_gather', 'ring')
TEACHERS = ('same_pass', 'second_pass', 'ema', 'bank', 'previous_step')
DIAGONAL_MODES = ('keep', 'remove')
SOFT_WEIGHTS = ('constant', 'off_diagonal')


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the training loss is. Validated on construction (ValueError naming the key).

    kind: 'clip' | 'psd' | 'sigmoid'.
    subset_fraction: fraction of each global batch whose rows/columns get soft targets (PSD).
    teacher: 'same_pass' (this step's logits, no added compute), 'second_pass' (a stop-gradient
      forward of the same parameters over the subset on the teacher view), 'ema' (the same with
      EMA parameters) or 'bank' (each pair's embeddings from its previous visit, kept in the
      train state: a teacher from an earlier point of training at no added compute; pairs seen
      for the first time keep one-hot targets) or 'previous_step' (as DLB: the first
      round(subset_fraction B) pairs of each batch repeat pairs of the previous batch, and the
      previous step's embeddings of them are the teacher among them: no added compute;
      subset_fraction <= 0.5).
    teacher_temperature: teacher softmax temperature relative to the student's (teacher logits
      are the teacher's scaled similarities divided by this).
    teacher_diagonal: 'keep' or 'remove' (drop the matching pair from the teacher distribution and
      renormalise over the others).
    ema_momentum: decay of the EMA parameters (teacher='ema').
    soft_weight: how much of a subset row's target is the teacher's: 'constant' (a), or
      'off_diagonal' (a times the teacher's probability mass off the row's own pair: a teacher
      sure of the given pair leaves the target one-hot, one that sees other matches shares it).
    impl: 'all_gather' (each device holds b x B slabs) or 'ring' (b x tile tiles, the other
      modality circulating; for very large global batches); tile: the ring's tile width,
      dividing the per-device batch (0: the whole block).
    precision: of the similarity matmuls, 'float32' (HIGHEST) or 'bfloat16' (inputs rounded,
      float32 accumulation; losses/matmul.py).
    allow_degenerate: accept teacher='same_pass' with temperature 1 and the diagonal kept, which
      is CLIP with its gradient scaled by (1 - a) (only for tests and ablations).
    """
    # The defaults are the setting the selection protocol chose (docs/results/protocol.md: the
    # sweep's EMA teacher at twice the student's temperature, with the teacher's share of each
    # row weighted by its off-diagonal mass); config.base_config() reads them from here.
    kind: str = 'psd'
    subset_fraction: float = 0.5
    teacher: str = 'ema'
    teacher_temperature: float = 2.0
    teacher_diagonal: str = 'keep'
    ema_momentum: float = 0.99
    soft_weight: str = 'off_diagonal'
    allow_degenerate: bool = False
    impl: str = 'all_gather'
    tile: int = 0
    precision: str = 'float32'

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f'loss.kind={self.kind!r} is not known; allowed: {list(LOSS_KINDS)}')
        if self.teacher not in TEACHERS:
            raise ValueError(f'psd.teacher={self.teacher!r} is not known; allowed: '
                             f'{list(TEACHERS)}')
        if self.teacher_diagonal not in DIAGONAL_MODES:
            raise ValueError(f'psd.teacher_diagonal={self.teacher_diagonal!r} is not known; '
                             f'allowed: {list(DIAGONAL_MODES)}')
        if self.soft_weight not in SOFT_WEIGHTS:
            raise ValueError(f'psd.soft_weight={self.soft_weight!r} is not known; allowed: '
                             f'{list(SOFT_WEIGHTS)}')
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f'loss.impl={self.impl!r} is not known; allowed: '
                             f'{list(LOSS_IMPLS)}')
        if self.tile < 0:
            raise ValueError(f'loss.tile={self.tile} must be >= 0 (0: the whole per-device '
                             'block)')
        if self.precision not in PRECISIONS:
            raise ValueError(f'loss.precision={self.precision!r} is not known; allowed: '
                             f'{list(PRECISIONS)}')
        check_fraction(self.subset_fraction)
        if self.teacher == 'previous_step' and self.subset_fraction > 0.5:
            raise ValueError(f"psd.subset_fraction={self.subset_fraction}: psd.teacher="
                             "'previous_step' repeats that fraction of each batch in the next "
                             "one, which needs a fraction <= 0.5")
        if not self.teacher_temperature > 0:
            raise ValueError(f'psd.teacher_temperature={self.teacher_temperature} must be > 0')
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f'psd.ema_momentum={self.ema_momentum} must be in [0, 1)')
        if self.kind == 'psd' and self.is_degenerate and not self.allow_degenerate:
            raise ValueError(
                "psd.teacher='same_pass' with psd.teacher_temperature=1 and "
                "psd.teacher_diagonal='keep' is degenerate: the soft-target gradient is then "
                "(1 - a) times the CLIP gradient, with no many-to-many signal. Use a teacher "
                "temperature other than 1, teacher_diagonal='remove', or another teacher "
                "(second_pass, ema); set psd.allow_degenerate=True only to study this case.")

    @property
    def is_degenerate(self) -> bool:
        return (self.teacher == 'same_pass' and self.teacher_temperature == 1.0
                and self.teacher_diagonal == 'keep')

    @property
    def needs_teacher_forward(self) -> bool:
        return self.kind == 'psd' and self.teacher in ('second_pass', 'ema')

    @property
    def needs_bank(self) -> bool:
        """Whether the train state keeps an embedding bank (and batches carry 'index')."""
        return self.kind == 'psd' and self.teacher == 'bank'

    @property
    def needs_index(self) -> bool:
        """Whether batches carry 'index' (dataset positions): the bank and previous-step
        teachers find a pair's earlier embeddings by it."""
        return self.kind == 'psd' and self.teacher in ('bank', 'previous_step')

    @property
    def needs_carry(self) -> bool:
        """Whether the train state keeps the last step's embeddings of the repeated pairs."""
        return self.kind == 'psd' and self.teacher == 'previous_step'

    def repeated_pairs(self, batch_size: int) -> int:
        """Pairs of each global batch repeated from the previous one (previous-step teacher)."""
        if not self.needs_carry:
            return 0
        return subset_size(batch_size, self.subset_fraction)

    @classmethod
    def from_mapping(cls, kind: str, psd: Mapping[str, Any] | None = None,
                     **loss_keys: Any) -> 'LossConfig':
        """Build from a config section (`psd`: config.loss.psd's keys; `loss_keys`: impl,
        tile, precision), rejecting unknown keys by name; what is not given takes the
        dataclass's default, the only one."""
        psd = dict(psd or {})
        fields = {f.name for f in dataclasses.fields(cls)} - CONFIG_LOSS_KEYS
        unknown = sorted(set(psd) - fields)
        if unknown:
            raise ValueError(f'psd keys {unknown} are not known; allowed: {sorted(fields)}')
        unknown = sorted(set(loss_keys) - CONFIG_LOSS_KEYS)
        if unknown:
            raise ValueError(f'loss keys {unknown} are not known; allowed: '
                             f'{sorted(CONFIG_LOSS_KEYS - {"kind"})}')
        return cls(kind=kind, **loss_keys, **psd)


# LossConfig fields that are config.loss's own keys, not config.loss.psd's
CONFIG_LOSS_KEYS = frozenset({'kind', 'impl', 'tile', 'precision'})


class Teacher(NamedTuple):
    """Teacher embeddings for a second pass or EMA parameters.

    image, text: (B, D) unit-norm, rows outside the subset may hold anything (they are masked);
    logit_scale: the teacher's raw logit scale; column_mask: (B,) bool, which items the teacher
    saw (the subset). A teacher of None means the same pass (this step's own embeddings).
    """
    image: jax.Array
    text: jax.Array
    logit_scale: jax.Array
    column_mask: jax.Array


def check_fraction(fraction: float) -> None:
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f'psd.subset_fraction={fraction} must be in [0, 1]')


def subset_size(batch_size: int, fraction: float) -> int:
    """Number of items of a global batch that get soft targets."""
    check_fraction(fraction)
    return int(round(batch_size * fraction))


def subset_indices(rng: jax.Array, batch_size: int, fraction: float) -> jax.Array:
    """Sorted global indices (k,) of a uniformly random subset of the batch, k = round(f B)."""
    k = subset_size(batch_size, fraction)
    return jnp.sort(jax.random.permutation(rng, batch_size)[:k])


def subset_mask(indices: jax.Array, batch_size: int) -> jax.Array:
    """(B,) bool mask of `indices`."""
    return jnp.zeros((batch_size,), bool).at[indices].set(True)
