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


def _embed(fn, variables, x: np.ndarray, mesh, batch_size: int) -> np.ndarray:
    """fn over x in padded batches of `batch_size` -> (len(x), D) numpy."""
    n = len(x)
    if n > batch_size:
        raise ValueError(f'a batch of {n} examples exceeds eval.batch={batch_size}')
    out = fn(variables, jax.device_put(_pad(np.asarray(x), batch_size),
                                       shd.batch_sharding(mesh)))
    return jax.device_get(out)[:n]


def embed_batches(model, variables: Any, batches: Iterable[dict], mesh,
                  batch_size: int) -> dict[str, np.ndarray]:
    """{'image': (N, D), 'text': (N, D), other keys as given} for host batches of up to
    `batch_size` examples ('image' float (b, H, W, 3), 'text' int (b, L); either may be
    absent)."""
    shd.check_batch(batch_size, mesh, 'eval.batch')
    embed_images, embed_texts = _embed_fns(model, mesh)
    fns = {'image': embed_images, 'text': embed_texts}
    out: dict[str, list] = {}
    for batch in batches:
        for key, value in batch.items():
            if key in fns:
                value = _embed(fns[key], variables, value, mesh, batch_size)
            out.setdefault(key, []).append(np.asarray(value))
    if not out:
        raise ValueError('the evaluation data yielded no batches')
    return {k: np.concatenate(v) for k, v in out.items()}


def embed_tokens(model, variables: Any, tokens: np.ndarray, mesh, batch_size: int) -> np.ndarray:
    """(N, L) token ids -> (N, D) unit-norm text embeddings."""
    shd.check_batch(batch_size, mesh, 'eval.batch')
    _, embed_texts = _embed_fns(model, mesh)
    parts = [_embed(embed_texts, variables, tokens[i:i + batch_size], mesh, batch_size)
             for i in range(0, len(tokens), batch_size)]
    return np.concatenate(parts)
