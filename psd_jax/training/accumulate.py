"""Gradient accumulation that keeps every negative (GradCache; `train.micro_batches = k`).

Activation memory is that of one micro-batch, yet the loss sees the whole global batch:
1. embed all k micro-batches without gradients (a scan, one micro-batch of activations live);
2. the loss over the whole global batch of embeddings (soft targets and teachers included) and
   its gradient with respect to the embeddings and the logit scale (and bias);
3. for each micro-batch, recompute its embeddings with gradients and pull that micro-batch's
   embedding gradient back to the parameters (a vjp), accumulating over the k micro-batches.
The result is the one-big-batch gradient (tests/test_accumulate.py). A micro-batch takes the
same rows of every data shard, so splitting needs no communication.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def check_micro_batches(k: int, per_shard: int, has_batch_norm: bool) -> None:
    """ValueError naming train.micro_batches when k cannot split the batch (or BatchNorm)."""
    if k < 1 or per_shard % k:
        raise ValueError(f'train.micro_batches={k} must divide the per-shard batch {per_shard} '
                         f'(global batch / data shards); use one of '
                         f'{[d for d in range(1, per_shard + 1) if per_shard % d == 0]}')
    if k > 1 and has_batch_norm:
        raise ValueError('train.micro_batches > 1 with a BatchNorm tower (the RN50 presets) is '
                         'not supported: BatchNorm would normalise each micro-batch with its own '
                         'statistics, so the gradient would not be the global batch\'s; use a '
                         'ViT preset or train.micro_batches=1')


def split(x: jax.Array, k: int, shards: int) -> jax.Array:
    """(B, ...) -> (k, B / k, ...): micro-batch j holds rows [j b/k, (j+1) b/k) of every
    shard's b rows, so each micro-batch stays evenly spread over the shards."""
    b = x.shape[0] // shards
    x = x.reshape(shards, k, b // k, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(k, x.shape[0] * (b // k), *x.shape[3:])


def merge(x: jax.Array, shards: int) -> jax.Array:
    """The inverse of `split`: (k, B / k, ...) -> (B, ...) in the original order."""
    k, m = x.shape[:2]
    x = x.reshape(k, shards, m // shards, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(k * m, *x.shape[3:])


def grads(embed: Callable[[Any, dict], dict], params: Any, batch: dict,
          loss_of: Callable[[dict], tuple[jax.Array, Any]], k: int,
          shards: int, rng: jax.Array) -> tuple[tuple[jax.Array, Any], Any, dict]:
    """((loss, aux), parameter gradients, full-batch embeddings) by GradCache.

    embed(params, micro_batch) -> {'image': (m, D), 'text': (m, D), ...}: the model's
    outputs for {'image', 'text', 'rng'} (micro-batch j's key is split(rng, k)[j] in both of
    its forwards, so randomness such as patch dropout is the same when it is recomputed);
    loss_of({'image', 'text', 'logit_scale'[, 'logit_bias']} of the whole batch) -> (loss,
    aux); the scale (and bias) are the parameters themselves."""
    micro = {key: split(value, k, shards) for key, value in batch.items()
             if key in ('image', 'text')}
    micro['rng'] = jax.random.split(rng, k)

    def no_grad(_, mb):
        out = jax.lax.stop_gradient(embed(params, mb))
        return None, (out['image'], out['text'])

    _, (image, text) = jax.lax.scan(no_grad, None, micro)
    scalars = {key: params[key] for key in ('logit_scale', 'logit_bias') if key in params}
    full = {'image': merge(image, shards), 'text': merge(text, shards)}
    (loss, aux), (d_emb, d_scalars) = jax.value_and_grad(
        lambda e, s: loss_of({**e, **s}), argnums=(0, 1), has_aux=True)(full, scalars)
    d_micro = {key: split(value, k, shards) for key, value in d_emb.items()}

    def pull_back(total, inputs):
        mb, d_image, d_text = inputs
        _, vjp = jax.vjp(lambda p: {key: embed(p, mb)[key] for key in ('image', 'text')},
                         params)
        (g,) = vjp({'image': d_image, 'text': d_text})
        return jax.tree.map(jnp.add, total, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    param_grads, _ = jax.lax.scan(pull_back, zeros, (micro, d_micro['image'], d_micro['text']))
    for key, value in d_scalars.items():  # the logit scale (and bias) enter only the loss
        param_grads = {**param_grads, key: param_grads[key] + value}
    return (loss, aux), param_grads, full
