"""Embed a dataset's images and captions with the current parameters, sharded over the mesh and
gathered across hosts.

Each host embeds its shard of the evaluation data; every batch is padded to a whole batch (and
hosts with fewer batches feed empty ones, so collectives match), the padding rows are masked
out, and the results of all hosts are gathered, so every host returns the same full arrays. No
example is lost and nothing recompiles.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from typing import Any, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from psd_jax.training import batch as batch_lib
from psd_jax import sharding as shd


@functools.lru_cache(maxsize=8)
def embed_fns(model, mesh):
    rows = shd.batch_sharding(mesh)

    @functools.partial(jax.jit, out_shardings=rows)
    def images(variables, x):
        with shd.activation_rules(mesh):
            return model.apply(variables, x, method=model.encode_image)

    @functools.partial(jax.jit, out_shardings=rows)
    def texts(variables, t):
        with shd.activation_rules(mesh):
            return model.apply(variables, t, method=model.encode_text)

    return {'image': images, 'text': texts}


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    pad = np.zeros((size - len(x),) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


def text_ids(values: np.ndarray) -> np.ndarray:
    """Stable int64 ids of strings (equal strings, equal ids), so they can cross hosts."""
    out = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        data = v if isinstance(v, bytes) else str(v).encode()
        out[i] = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), 'little',
                                signed=True)
    return out


def _gather(x: np.ndarray) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True)) if (
        jax.process_count() > 1) else x


def embed_batches(model, variables: Any, batches: Iterable[dict], mesh, batch_size: int,
                  num_batches: int | None = None) -> dict[str, np.ndarray]:
    """{'image': (N, D), 'text': (N, D), ...} over all hosts' examples.

    batches: this host's batches of up to `batch_size` examples ('image' and 'text' as
    psd_jax/training/batch.py defines them, either may be absent; other numeric keys come along;
    string keys such as 'caption' come back as '<key>_id' int64 ids). num_batches: the batch
    count every host runs (required with several hosts, whose shards may differ by a batch).
    """
    shd.check_batch(batch_size * jax.process_count(), mesh, 'eval.batch')
    if jax.process_count() > 1 and num_batches is None:
        raise ValueError('embed_batches needs num_batches when several hosts take part')
    fns = embed_fns(model, mesh)
    spec = batch_lib.input_spec(model, batch_size)
    rows = shd.batch_sharding(mesh)
    iterator = iter(batches)
    template: dict | None = None
    out: dict[str, list] = {}
    for index in itertools.count():
        if num_batches is not None and index >= num_batches:
            break
        batch = next(iterator, None)
        if batch is None:
            if num_batches is None or template is None:
                break
            batch = {k: v[:0] for k, v in template.items()}  # an empty batch: padding only
        template = template or batch
        n = len(next(iter(batch.values())))
        if n > batch_size:
            raise ValueError(f'a batch of {n} examples exceeds eval.batch={batch_size}')
        mask = _gather(np.arange(batch_size) < n)
        for key, value in batch.items():
            value = np.asarray(value)
            if value.dtype.kind in 'OSU':
                key, value = f'{key}_id', text_ids(value)
            padded = _pad(value, batch_size)
            if key in fns:
                batch_lib.check({key: padded}, {key: spec[key]}, 'evaluation batch')
                global_x = jax.make_array_from_process_local_data(rows, padded)
                result = multihost_utils.process_allgather(fns[key](variables, global_x),
                                                           tiled=True)
            else:
                result = _gather(padded)
            out.setdefault(key, []).append(np.asarray(result)[mask])
    if not out:
        raise ValueError('the evaluation data yielded no batches')
    return {k: np.concatenate(v) for k, v in out.items()}


def embed_tokens(model, variables: Any, tokens: np.ndarray, mesh, batch_size: int) -> np.ndarray:
    """(N, L) token ids, the same on every host -> (N, D) unit-norm text embeddings."""
    shd.check_batch(batch_size, mesh, 'eval.batch')
    fn = embed_fns(model, mesh)['text']
    rows = shd.batch_sharding(mesh)
    parts = []
    for i in range(0, len(tokens), batch_size):
        chunk = np.asarray(tokens[i:i + batch_size])
        padded = _pad(chunk, batch_size)  # every host holds all of it: each places its part
        global_x = jax.make_array_from_callback(padded.shape, rows, lambda idx: padded[idx])
        parts.append(np.asarray(multihost_utils.process_allgather(fn(variables, global_x),
                                                                  tiled=True))[:len(chunk)])
    return np.concatenate(parts)
