"""Embed a dataset's images and captions with the current parameters, sharded over the mesh.

The last batch is padded to a whole batch and the padding rows dropped, so no example is lost
and nothing recompiles.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import numpy as np

from psd_jax import sharding as shd


@functools.lru_cache(maxsize=8)
def _embed_fns(model, mesh):
    rows = shd.batch_sharding(mesh)

    @functools.partial(jax.jit, out_shardings=rows)
    def images(variables, x):
        return model.apply(variables, x, method=model.encode_image)

    @functools.partial(jax.jit, out_shardings=rows)
    def texts(variables, t):
        return model.apply(variables, t, method=model.encode_text)

    return images, texts


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    pad = np.zeros((size - len(x),) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


def embed_batches(model, variables: Any, batches: Iterable[dict], mesh,
                  batch_size: int) -> dict[str, np.ndarray]:
    """{'image': (N, D), 'text': (N, D), other keys as given} for host batches of up to
    `batch_size` examples ('image' float (b, H, W, 3), 'text' int (b, L))."""
    shd.check_batch(batch_size, mesh, 'eval.batch')
    embed_images, embed_texts = _embed_fns(model, mesh)
    rows = shd.batch_sharding(mesh)
    out: dict[str, list] = {}
    for batch in batches:
        n = len(batch['image'])
        if n > batch_size:
            raise ValueError(f'a batch of {n} examples exceeds eval.batch={batch_size}')
        image = jax.device_put(_pad(np.asarray(batch['image']), batch_size), rows)
        text = jax.device_put(_pad(np.asarray(batch['text']), batch_size), rows)
        out.setdefault('image', []).append(jax.device_get(embed_images(variables, image))[:n])
        out.setdefault('text', []).append(jax.device_get(embed_texts(variables, text))[:n])
        for key, value in batch.items():
            if key not in ('image', 'text'):
                out.setdefault(key, []).append(np.asarray(value))
    if not out:
        raise ValueError('the evaluation data yielded no batches')
    return {k: np.concatenate(v) for k, v in out.items()}
