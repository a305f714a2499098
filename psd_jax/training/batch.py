"""What a batch is: its keys, shapes and dtypes, decided here once.

The trainer builds its example batch from `batch_spec`, the input pipeline emits its keys, the
train step checks what it is given against it, the evaluator checks its image and caption
batches, and the benchmarks and tests draw their synthetic batches from it. docs/design.md
("The batch") says which step setups need which keys.

Keys (B: the global batch, S: the model's image size, L: its context length):
- 'image': uint8 (B, S, S, 3), the augmented view's RGB pixels (the model normalises them on
  the device: a quarter of float32's bytes cross from host to device);
- 'text': int32 (B, L), token ids;
- 'teacher_image': uint8 (B, S, S, 3), the un-augmented centre crop, for teachers that run a
  stop-gradient forward (second pass, EMA);
- 'index': int32 (B,), each pair's position in the training set, for teachers that find a
  pair's earlier embeddings by it (embedding bank, previous step).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

IMAGE_DTYPE = np.dtype(np.uint8)
TEXT_DTYPE = np.dtype(np.int32)
INDEX_DTYPE = np.dtype(np.int32)


def input_spec(model, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """{'image', 'text'} of `batch_size` examples for `model` (a DualEncoder): what every
    forward pass, in training and in evaluation, takes."""
    size = model.image_tower.image_size
    return {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), IMAGE_DTYPE),
            'text': jax.ShapeDtypeStruct((batch_size, model.text_tower.context_length),
                                         TEXT_DTYPE)}


def with_extras(spec: Mapping[str, jax.ShapeDtypeStruct], *, teacher_image: bool,
                index: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """`spec` plus the optional keys a loss asks for (see the module docstring)."""
    out = dict(spec)
    if teacher_image:
        out['teacher_image'] = spec['image']
    if index:
        out['index'] = jax.ShapeDtypeStruct(spec['image'].shape[:1], INDEX_DTYPE)
    return out


def check(batch: Mapping, spec: Mapping[str, jax.ShapeDtypeStruct], what: str = 'batch', *,
          rows: int | None = None) -> None:
    """Raise a ValueError naming the key at fault when `batch` (arrays or ShapeDtypeStructs)
    does not carry exactly the keys of `spec` with its shapes and dtypes. `rows`: the leading
    dimension expected instead of the spec's (a host's share of a global batch)."""
    missing = sorted(set(spec) - set(batch))
    extra = sorted(set(batch) - set(spec))
    if missing or extra:
        raise ValueError(f'{what}: keys {sorted(batch)} do not match {sorted(spec)} '
                         f'(missing {missing}, unexpected {extra}); see psd_jax/training/batch.py')
    for key, want in spec.items():
        shape = tuple(want.shape) if rows is None else (rows,) + tuple(want.shape[1:])
        got = batch[key]
        if tuple(got.shape) != shape or np.dtype(got.dtype) != np.dtype(want.dtype):
            raise ValueError(f"{what}[{key!r}] is {np.dtype(got.dtype).name}{tuple(got.shape)}, "
                             f'expected {np.dtype(want.dtype).name}{shape}')


def synthetic(spec: Mapping[str, jax.ShapeDtypeStruct], rng: np.random.Generator,
              vocab_size: int = 1000, dataset_size: int | None = None) -> dict[str, np.ndarray]:
    """Random host arrays shaped as `spec` (benchmarks and tests): uniform uint8 pixels,
    token ids in [1, vocab_size), distinct dataset indices in [0, dataset_size)."""
    out = {}
    for key, s in spec.items():
        if key == 'text':
            out[key] = rng.integers(1, vocab_size, s.shape).astype(s.dtype)
        elif key == 'index':
            n = s.shape[0] if dataset_size is None else dataset_size
            out[key] = rng.permutation(n)[:s.shape[0]].astype(s.dtype)
        elif np.dtype(s.dtype) == np.uint8:
            out[key] = rng.integers(0, 256, s.shape, dtype=np.uint8)
        else:
            out[key] = rng.standard_normal(s.shape).astype(s.dtype)
    return out
