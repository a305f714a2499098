"""The ring implementation of the contrastive losses: no device ever holds more than a b x t
tile of logits (b = B / data shards, t = `tile`), plus O(b x D) embeddings.

Inside `shard_map`, every device keeps its own b rows (say its images) and the other
modality's b columns (its captions) circulate around the ring of data shards with `ppermute`,
one hop per step of a scan; within a block, a second scan walks column tiles of width t. The
softmax losses keep running reductions per row (docs/design.md, "Sharding the similarity
matrix"): the student's max and sum of exponentials, the teacher's max and sums of exp(r) and
exp(r) s over valid columns, and the positive's logit, so one pass gives
    loss_i = LSE_i - (1 - w_i) s_ii - w_i sum_j softmax_j(r_ij) s_ij.
The backward pass is a custom VJP that recomputes every tile in a second trip around the ring
from the saved row log-sum-exps (student and teacher): d loss_i / d s_ij = p_ij - q_ij; the
rows' gradient accumulates in place, the circulating block's gradient travels with it and is
home after the last hop. The sigmoid loss needs no normaliser: its tiles are summed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from psd_jax.losses.matmul import matmul

NEG = -1e30  # a finite "minus infinity": exp(NEG - x) is 0 and NEG - NEG is 0, not NaN


def check_tile(tile: int, per_device: int) -> int:
    """The tile width to use: `tile` (0: the whole per-device block), which must divide it."""
    tile = tile or per_device
    if tile <= 0 or per_device % tile:
        raise ValueError(f'loss.tile={tile} must divide the per-device batch {per_device} '
                         f'(global batch / data shards); use 0 for the whole block or one of '
                         f'{[d for d in range(1, per_device + 1) if per_device % d == 0]}')
    return tile


def _shift(blocks: tuple, axes: tuple[str, ...], n: int) -> tuple:
    """Every circulating array one hop along the ring (device i sends to i + 1)."""
    if n == 1:
        return blocks
    perm = [(i, (i + 1) % n) for i in range(n)]
    return tuple(jax.lax.ppermute(x, axes, perm) for x in blocks)


def _zeros_like_rows(x: jax.Array, fill: float = 0.0) -> jax.Array:
    """(b,) filled with `fill`, varying over the data axes like `x` (scan carries must be)."""
    return jnp.full_like(x[:, 0], fill, dtype=jnp.float32)


def ring_visit(axes: tuple[str, ...], n: int, tile: int, me: jax.Array, blocks: tuple,
               carry, visit: Callable, travel: jax.Array | None = None):
    """Call `visit(carry, first_column, block_tiles) -> (carry, travel_update)` on every
    column tile of every device's block, the blocks circulating one hop at a time; returns
    (carry, travel). `travel` (b, ...), optional, rides with the blocks and receives each
    tile's `travel_update` (t, ...) at that tile's rows: after n hops it is home again."""
    b = blocks[0].shape[0]

    def hop(state, h):
        carry, blocks, travel = state
        src = (me - h) % n  # the device whose columns this block holds

        def one_tile(carry, k):
            views = tuple(jax.lax.dynamic_slice_in_dim(x, k * tile, tile) for x in blocks)
            return visit(carry, src * b + k * tile, views)

        carry, updates = jax.lax.scan(one_tile, carry, jnp.arange(b // tile))
        if travel is not None:
            travel = travel + updates.reshape(travel.shape)
            blocks, (travel,) = _shift(blocks, axes, n), _shift((travel,), axes, n)
        else:
            blocks = _shift(blocks, axes, n)
        return (carry, blocks, travel), None

    (carry, _, travel), _ = jax.lax.scan(hop, (carry, blocks, travel), jnp.arange(n))
    return carry, travel


def _dot(a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
    return matmul('id,jd->ij', a, b, precision)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The static shape of one softmax direction: the ring and the kind of targets."""
    axes: tuple[str, ...]
    n: int
    tile: int
    with_teacher: bool
    same_pass: bool
    remove_diagonal: bool
    inv_temperature: float
    precision: str

    def me(self) -> jax.Array:
        return jax.lax.axis_index(self.axes) if self.axes else jnp.int32(0)

    def logits(self, x, t_x, scale, t_scale, positives, columns, first, o, t_o):
        """One b x t tile: student logits s, positives, teacher logits r and valid columns."""
        ids = first + jnp.arange(o.shape[0])
        s = scale * _dot(x, o, self.precision)
        pos = ids[None, :] == positives[:, None]
        if not self.with_teacher:
            return s, pos, None, None
        valid = jnp.broadcast_to(
            jax.lax.dynamic_slice_in_dim(columns, first, o.shape[0])[None], s.shape)
        if self.remove_diagonal:
            valid = valid & ~pos
        r = (s * self.inv_temperature if self.same_pass
             else t_scale * self.inv_temperature * _dot(t_x, t_o, self.precision))
        return s, pos, r, valid

    def forward(self, x, others, scale, positives, weight, columns, t_x, t_others, t_scale):
        """((loss, hard, soft) per row, (student LSE, teacher LSE, has a teacher column))."""
        def visit(acc, first, views):
            s, pos, r, valid = self.logits(x, t_x, scale, t_scale, positives, columns, first,
                                           *views)
            m = jnp.maximum(acc['m'], s.max(axis=1))
            acc = {**acc, 'm': m, 'z': acc['z'] * jnp.exp(acc['m'] - m)
                   + jnp.exp(s - m[:, None]).sum(axis=1),
                   'diag': acc['diag'] + jnp.where(pos, s, 0.0).sum(axis=1)}
            if self.with_teacher:
                n_ = jnp.maximum(acc['n'], jnp.where(valid, r, NEG).max(axis=1))
                e = jnp.where(valid, jnp.exp(r - n_[:, None]), 0.0)
                rescale = jnp.exp(acc['n'] - n_)
                acc.update(n=n_, y=acc['y'] * rescale + e.sum(axis=1),
                           a=acc['a'] * rescale + (e * s).sum(axis=1))
            return acc, None

        init = {k: _zeros_like_rows(x, NEG if k in ('m', 'n') else 0.0)
                for k in ('m', 'z', 'diag', 'n', 'y', 'a')}
        acc, _ = ring_visit(self.axes, self.n, self.tile, self.me(), (others, t_others), init,
                            visit)
        lse = acc['m'] + jnp.log(acc['z'])
        hard = lse - acc['diag']
        has_t = acc['y'] > 0
        y = jnp.where(has_t, acc['y'], 1.0)
        lse_t = jnp.where(has_t, acc['n'] + jnp.log(y), 0.0)
        if not self.with_teacher:
            return (hard, hard, jnp.zeros_like(hard)), (lse, lse_t, has_t)
        soft = lse - jnp.where(has_t, acc['a'] / y, acc['diag'])  # none valid: one-hot
        return (hard + weight * (soft - hard), hard, soft), (lse, lse_t, has_t)

    def backward(self, residuals, cotangents):
        """Cotangents of (x, others, scale) from a second trip: d loss_i / d s_ij = p - q."""
        (x, others, scale, positives, weight, columns, t_x, t_others, t_scale), stats = residuals
        lse, lse_t, has_t = stats
        g_loss, g_hard, g_soft = cotangents
        c_p = g_loss + g_hard + (g_soft if self.with_teacher else 0.0)
        to_teacher = (g_loss * weight + g_soft) if self.with_teacher else jnp.zeros_like(c_p)
        c_t = to_teacher * has_t
        c_e = (g_loss * (1 - weight) + g_hard + to_teacher * ~has_t if self.with_teacher
               else c_p)

        def visit(acc, first, views):
            o, t_o = views
            s, pos, r, valid = self.logits(x, t_x, scale, t_scale, positives, columns, first,
                                           o, t_o)
            d_s = c_p[:, None] * jnp.exp(s - lse[:, None]) - c_e[:, None] * pos
            if self.with_teacher:
                d_s = d_s - c_t[:, None] * jnp.where(valid, jnp.exp(r - lse_t[:, None]), 0.0)
            d_x = acc['x'] + scale * matmul('ij,jd->id', d_s, o, self.precision)
            d_o = scale * matmul('ij,id->jd', d_s, x, self.precision)
            return {'x': d_x, 'scale': acc['scale'] + jnp.sum(d_s * s) / scale}, d_o

        init = {'x': jnp.zeros_like(x), 'scale': _zeros_like_rows(x)[0]}
        acc, d_others = ring_visit(self.axes, self.n, self.tile, self.me(), (others, t_others),
                                   init, visit, travel=jnp.zeros_like(others))
        return acc['x'], d_others, acc['scale'], None, None, None, None, None, None


@functools.lru_cache(maxsize=None)
def softmax_rows(axes: tuple[str, ...], n: int, tile: int, with_teacher: bool, same_pass: bool,
                 remove_diagonal: bool, inv_temperature: float, precision: str):
    """Per-row (loss, hard CE, soft CE) of this device's rows against all columns, the
    columns circulating. Arguments: x (b, D) local rows; others (b, D) this device's columns;
    scale t (varying scalar); positives (b,) global column of each row's pair; weight (b,);
    columns (B,) bool, the items the teacher saw; t_x, t_others (b, D) and t_scale the
    teacher's (ignored for the same pass)."""
    spec = _Rows(axes, n, tile, with_teacher, same_pass, remove_diagonal, inv_temperature,
                 precision)

    @jax.custom_vjp
    def rows(*args):
        return spec.forward(*args)[0]

    def fwd(*args):
        out, stats = spec.forward(*args)
        return out, (args, stats)

    rows.defvjp(fwd, spec.backward)
    return rows


def teacher_positive_probs(axes: tuple[str, ...], n: int, tile: int, same_pass: bool,
                           remove_diagonal: bool, inv_temperature: float, precision: str,
                           x, others, scale, positives, columns, t_x, t_others, t_scale):
    """(b,) the teacher's probability of each row's own pair (0 where that column is not
    valid), from one forward trip around the ring with running max and sum per row; arguments
    as `softmax_rows`' (constants: no gradient flows through a target)."""
    spec = _Rows(axes, n, tile, True, same_pass, remove_diagonal, inv_temperature, precision)
    x, others, scale, t_x, t_others, t_scale = jax.lax.stop_gradient(
        (x, others, scale, t_x, t_others, t_scale))

    def visit(acc, first, views):
        _, pos, r, valid = spec.logits(x, t_x, scale, t_scale, positives, columns, first,
                                       *views)
        m = jnp.maximum(acc['m'], jnp.where(valid, r, NEG).max(axis=1))
        e = jnp.where(valid, jnp.exp(r - m[:, None]), 0.0)
        return {'m': m, 'z': acc['z'] * jnp.exp(acc['m'] - m) + e.sum(axis=1),
                'pos': acc['pos'] + jnp.where(pos & valid, r, 0.0).sum(axis=1),
                'has': acc['has'] + (pos & valid).sum(axis=1)}, None

    init = {k: _zeros_like_rows(x, NEG if k == 'm' else 0.0) for k in ('m', 'z', 'pos', 'has')}
    acc, _ = ring_visit(axes, n, tile, spec.me(), (others, t_others), init, visit)
    z = jnp.where(acc['z'] > 0, acc['z'], 1.0)
    return jnp.where(acc['has'] > 0, jnp.exp(acc['pos'] - acc['m'] - jnp.log(z)), 0.0)


@functools.lru_cache(maxsize=None)
def sigmoid_rows(axes: tuple[str, ...], n: int, tile: int, precision: str):
    """Sum over this device's rows and all columns of log sigmoid(z_ij (s_ij + bias)), the
    columns circulating; custom VJP with a second trip around the ring."""

    def visit_fn(x, scale, bias, positives, grads=None):
        def visit(acc, first, views):
            (o,) = views
            s = scale * _dot(x, o, precision)
            z = jnp.where((first + jnp.arange(o.shape[0]))[None, :] == positives[:, None],
                          1.0, -1.0)
            if grads is None:
                return acc + jnp.sum(jax.nn.log_sigmoid(z * (s + bias))), None
            d_s = grads * z * jax.nn.sigmoid(-z * (s + bias))  # d/ds of g * log sigmoid
            return {'x': acc['x'] + scale * matmul('ij,jd->id', d_s, o, precision),
                    'scale': acc['scale'] + jnp.sum(d_s * s) / scale,
                    'bias': acc['bias'] + jnp.sum(d_s)}, scale * matmul(
                        'ij,id->jd', d_s, x, precision)
        return visit

    def me():
        return jax.lax.axis_index(axes) if axes else jnp.int32(0)

    @jax.custom_vjp
    def total(x, others, scale, bias, positives):
        acc, _ = ring_visit(axes, n, tile, me(), (others,), _zeros_like_rows(x)[0],
                            visit_fn(x, scale, bias, positives))
        return acc

    def fwd(x, others, scale, bias, positives):
        return total(x, others, scale, bias, positives), (x, others, scale, bias, positives)

    def bwd(residuals, g):
        x, others, scale, bias, positives = residuals
        init = {'x': jnp.zeros_like(x), 'scale': _zeros_like_rows(x)[0],
                'bias': _zeros_like_rows(x)[0]}
        acc, d_others = ring_visit(axes, n, tile, me(), (others,), init,
                                   visit_fn(x, scale, bias, positives, grads=g),
                                   travel=jnp.zeros_like(others))
        return acc['x'], d_others, acc['scale'], acc['bias'], None

    total.defvjp(fwd, bwd)
    return total
