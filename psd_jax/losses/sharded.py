"""CLIP, Progressive Self-Distillation (PSD) and sigmoid losses over a sharded similarity matrix
(LossConfig, Teacher and the subset live in config.py, the ring's arithmetic in ring.py).

All losses take L2-normalised image embeddings `image` (B, D) and text embeddings `text` (B, D),
sharded over the mesh's data axes, and the raw `logit_scale` parameter (t = exp(logit_scale),
clipped to 100). They run inside `jax.shard_map` with the all_gather scheme: each device gathers
the other modality's embeddings and computes its own b x B slab of rows (its images vs all
captions) and b x B slab of columns (its captions vs all images), b = B / data shards. No device
holds the B x B matrix; gradients flow back through the gathers as reduce-scatters.

PSD (docs/design.md, "The losses"): rows i and columns j in a random subset S use soft targets
q = (1 - a) e + a softmax(teacher logits / teacher temperature); the rest keep one-hot targets.
With soft targets, loss_i = logsumexp_j s_ij - sum_j q_ij s_ij, and its gradient is p - q.
Returned parts: `clip` (the plain CLIP loss of this batch, both directions), `distill` (mean
cross-entropy against the teacher distribution over the subset's rows and columns), `alpha`,
`subset_size`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from psd_jax import sharding as shd
from psd_jax.losses import ring
from psd_jax.losses.config import LossConfig, Teacher
from psd_jax.losses.matmul import matmul
from psd_jax.models.clip import logit_scale_value



def _check_embeddings(image: jax.Array, text: jax.Array, mesh: Mesh) -> None:
    if image.ndim != 2 or text.ndim != 2:
        raise ValueError(f'image and text embeddings must be (batch, dim); got {image.shape} and '
                         f'{text.shape}')
    if image.shape[0] != text.shape[0]:
        raise ValueError(f'image batch {image.shape[0]} and text batch {text.shape[0]} differ; '
                         'every image needs its caption')
    if image.shape[1] != text.shape[1]:
        raise ValueError(f'image dim {image.shape[1]} and text dim {text.shape[1]} differ')
    shd.check_batch(image.shape[0], mesh, 'embedding batch')


def _gather(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.all_gather(x, axes, axis=0, tiled=True) if axes else x


def _shard_offset(axes: tuple[str, ...], b: int) -> jax.Array:
    return jax.lax.axis_index(axes) * b if axes else jnp.int32(0)


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.psum(x, axes) if axes else x


def _slab(local: jax.Array, others: jax.Array, scale: jax.Array, precision: str) -> jax.Array:
    """scale * local @ others.T: (b, D) x (B, D) -> (b, B) in float32."""
    return scale * matmul('id,jd->ij', local, others, precision)


def _teacher_probs(logits: jax.Array, valid: jax.Array, fallback: jax.Array) -> jax.Array:
    """Softmax over the valid columns of each row; rows with none fall back to `fallback`."""
    masked = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(masked, axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(valid, jnp.exp(masked - m), 0.0)
    z = jnp.sum(e, axis=1, keepdims=True)
    return jnp.where(z > 0, e / jnp.where(z > 0, z, 1.0), fallback)


def _teacher_rows(s, positives, columns, t_x, t_others, t_scale, fallback, *, same_pass,
                  remove_diagonal, inv_temperature, precision) -> jax.Array:
    """The teacher's distribution over one device's b x B slab: a softmax of its logits (the
    student's `s` / T for the same pass, else its own slab) over the valid columns; rows with
    none take `fallback`."""
    valid = jnp.broadcast_to(columns[None, :], fallback.shape)
    if remove_diagonal:
        valid = valid & (jnp.arange(fallback.shape[1])[None, :] != positives[:, None])
    logits = (s * inv_temperature if same_pass
              else _slab(t_x, t_others, t_scale * inv_temperature, precision))
    return _teacher_probs(logits, valid, fallback)


def _positive_probs(x, others, scale, positives, columns, t_x, t_others, t_scale, *,
                    same_pass, remove_diagonal, inv_temperature, precision) -> jax.Array:
    """(b,) the teacher's probability of each row's own pair over one device's b x B slab (0
    where that column is not valid); constants: no gradient flows through a target."""
    x, others, scale, t_x, t_others, t_scale = jax.lax.stop_gradient(
        (x, others, scale, t_x, t_others, t_scale))
    s = _slab(x, others, scale, precision) if same_pass else None
    zeros = jnp.zeros((x.shape[0], others.shape[0]), jnp.float32)
    probs = _teacher_rows(s, positives, columns, t_x, t_others, t_scale, zeros,
                          same_pass=same_pass, remove_diagonal=remove_diagonal,
                          inv_temperature=inv_temperature, precision=precision)
    return jnp.take_along_axis(probs, positives[:, None], axis=1)[:, 0]


@functools.lru_cache(maxsize=None)
def _slab_losses(with_teacher: bool, same_pass: bool, remove_diagonal: bool,
                 inv_temperature: float, precision: str):
    """Per-row (loss, hard CE, soft CE) of one device's slab in one direction, with a custom
    backward that recomputes the b x B logits from the inputs, so only the row log-sum-exps are
    kept between the passes.

    Arguments: x (b, D) local embeddings; others (B, D) the other modality's gathered
    embeddings; scale t; positives (b,) global column of each row's pair; weight (b,) a for rows
    in the subset, else 0; columns (B,) items the teacher saw; t_x, t_others, t_scale the
    teacher's (ignored for the same pass). d loss_i / d s_ij = p_ij - q_ij with
    q = (1 - w_i) e_i + w_i p_teacher.
    """

    def teacher(s, positives, columns, t_x, t_others, t_scale):
        onehot = jax.nn.one_hot(positives, s.shape[1], dtype=s.dtype)
        return _teacher_rows(s, positives, columns, t_x, t_others, t_scale, onehot,
                             same_pass=same_pass, remove_diagonal=remove_diagonal,
                             inv_temperature=inv_temperature, precision=precision)

    def forward(x, others, scale, positives, weight, columns, t_x, t_others, t_scale):
        s = _slab(x, others, scale, precision)
        lse = jax.nn.logsumexp(s, axis=1)
        hard = lse - jnp.take_along_axis(s, positives[:, None], axis=1)[:, 0]
        if not with_teacher:
            return (hard, hard, jnp.zeros_like(hard)), lse
        p_t = teacher(s, positives, columns, t_x, t_others, t_scale)
        soft = lse - jnp.sum(p_t * s, axis=1)
        return (hard + weight * (soft - hard), hard, soft), lse

    @jax.custom_vjp
    def losses_of(*args):
        return forward(*args)[0]

    def fwd(*args):
        out, lse = forward(*args)
        return out, (args, lse)

    def bwd(residuals, cotangents):
        (x, others, scale, positives, weight, columns, t_x, t_others, t_scale), lse = residuals
        g_loss, g_hard, g_soft = cotangents
        s = _slab(x, others, scale, precision)
        p = jnp.exp(s - lse[:, None])
        onehot = jax.nn.one_hot(positives, s.shape[1], dtype=s.dtype)
        if with_teacher:
            p_t = teacher(s, positives, columns, t_x, t_others, t_scale)
            d_s = ((g_loss + g_hard + g_soft)[:, None] * p
                   - (g_loss * (1 - weight) + g_hard)[:, None] * onehot
                   - (g_loss * weight + g_soft)[:, None] * p_t)
        else:
            d_s = (g_loss + g_hard)[:, None] * (p - onehot)
        d_x = scale * matmul('ij,jd->id', d_s, others, precision)
        d_others = scale * matmul('ij,id->jd', d_s, x, precision)
        d_scale = jnp.sum(d_s * s) / scale  # s = t x.o, so ds/dt = s / t
        return d_x, d_others, d_scale, None, None, None, None, None, None

    losses_of.defvjp(fwd, bwd)
    return losses_of


def _contrastive(image, text, scale, subset, alpha, t_image, t_text, t_scale, t_columns, *,
                 axes, batch_size, with_teacher, same_pass, remove_diagonal, inv_temperature,
                 n, tile, precision, off_diagonal=False):
    """Body run on each device: local (b, D) embeddings, replicated scalars and (B,) masks.
    tile None: the all_gather slabs; else the ring over the n data shards with b x tile tiles.
    off_diagonal: each subset row's teacher share is a times the teacher's mass off its pair."""
    b = image.shape[0]
    offset = _shard_offset(axes, b)
    positives = offset + jnp.arange(b)
    local_subset = jnp.zeros((b,), jnp.float32)
    if with_teacher:
        local_subset = jax.lax.dynamic_slice_in_dim(subset, offset, b).astype(jnp.float32)
    weight = alpha * local_subset
    t = logit_scale_value(scale)
    if axes:  # the scale enters every device's slab: its gradient is summed over devices
        t = jax.lax.pcast(t, axes, to='varying')
    ts = logit_scale_value(t_scale)
    static = dict(same_pass=same_pass, remove_diagonal=remove_diagonal,
                  inv_temperature=inv_temperature, precision=precision)
    weight_r = weight_c = weight
    if tile is not None:  # ring: the other modality's local block circulates, teachers' included
        if with_teacher and off_diagonal:
            share = functools.partial(ring.teacher_positive_probs, axes, n, tile, same_pass,
                                      remove_diagonal, inv_temperature, precision)
            weight_r = weight * (1 - share(image, text, t, positives, t_columns, t_image,
                                           t_text, ts))
            weight_c = weight * (1 - share(text, image, t, positives, t_columns, t_text,
                                           t_image, ts))
        rows = ring.softmax_rows(axes, n, tile, with_teacher, same_pass, remove_diagonal,
                                 inv_temperature, precision)
        loss_r, hard_r, soft_r = rows(image, text, t, positives, weight_r, t_columns, t_image,
                                      t_text, ts)
        loss_c, hard_c, soft_c = rows(text, image, t, positives, weight_c, t_columns, t_text,
                                      t_image, ts)
    else:
        teacher_text, teacher_image = t_text, t_image  # placeholders unless a teacher ran
        if with_teacher and not same_pass:
            teacher_text, teacher_image = _gather(t_text, axes), _gather(t_image, axes)
        texts, images = _gather(text, axes), _gather(image, axes)
        if with_teacher and off_diagonal:
            weight_r = weight * (1 - _positive_probs(image, texts, t, positives, t_columns,
                                                     t_image, teacher_text, ts, **static))
            weight_c = weight * (1 - _positive_probs(text, images, t, positives, t_columns,
                                                     t_text, teacher_image, ts, **static))
        slab_losses = _slab_losses(with_teacher, same_pass, remove_diagonal, inv_temperature,
                                   precision)
        loss_r, hard_r, soft_r = slab_losses(image, texts, t, positives, weight_r,
                                             t_columns, t_image, teacher_text, ts)
        loss_c, hard_c, soft_c = slab_losses(text, images, t, positives, weight_c,
                                             t_columns, t_text, teacher_image, ts)
    total = _psum(jnp.sum(loss_r) + jnp.sum(loss_c), axes) / (2 * batch_size)
    clip = _psum(jnp.sum(hard_r) + jnp.sum(hard_c), axes) / (2 * batch_size)
    n_subset = _psum(jnp.sum(local_subset), axes)
    distill = _psum(jnp.sum(local_subset * (soft_r + soft_c)), axes) / (
        2 * jnp.maximum(n_subset, 1.0))
    soft_weight = _psum(jnp.sum(weight_r + weight_c), axes) / (2 * jnp.maximum(n_subset, 1.0))
    return total, {'clip': clip, 'distill': distill, 'subset_size': n_subset,
                   'soft_weight': soft_weight}


def psd_loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array, *, mesh: Mesh,
             config: LossConfig, subset: jax.Array | None = None,
             alpha: float | jax.Array = 0.0,
             teacher: Teacher | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The PSD contrastive loss; CLIP when `subset` is None.

    image, text: (B, D) unit-norm embeddings sharded over the data axes; logit_scale: scalar;
    config: the loss's settings, the one place they have defaults (LossConfig: teacher
    temperature and diagonal, soft_weight, impl, tile, precision); subset: (B,) bool, the items
    whose row and column get soft targets; alpha: the mixing weight a; teacher: None for the
    same pass, else a `Teacher` (second pass / EMA). With soft_weight 'off_diagonal' the mean
    teacher share over the subset's rows and columns is reported as the part `soft_weight`.
    Returns (scalar loss, parts).
    """
    _check_psd_args(image, text, mesh, subset, teacher)
    teacher_temperature = config.teacher_temperature if subset is not None else 1.0
    impl, tile, precision = config.impl, config.tile, config.precision
    batch_size = image.shape[0]
    with_teacher = subset is not None
    same_pass = teacher is None
    axes = shd.data_axes(mesh)
    rows = shd.batch_partition(mesh)
    zero = jnp.zeros((), jnp.float32)
    if subset is None:
        subset = jnp.zeros((batch_size,), bool)
    if same_pass:
        teacher = Teacher(jnp.zeros_like(image), jnp.zeros_like(text), zero,
                          jnp.ones((batch_size,), bool))
    n = shd.data_size(mesh)
    ring_tile = _ring_tile(impl, tile, batch_size // n)
    body = jax.shard_map(
        lambda *a: _contrastive(
            *a, axes=axes, batch_size=batch_size, with_teacher=with_teacher, same_pass=same_pass,
            remove_diagonal=config.teacher_diagonal == 'remove',
            inv_temperature=1.0 / teacher_temperature, n=n, tile=ring_tile,
            precision=precision, off_diagonal=config.soft_weight == 'off_diagonal'),
        mesh=mesh,
        in_specs=(rows, rows, P(), P(), P(), rows, rows, P(), P()),
        out_specs=(P(), {'clip': P(), 'distill': P(), 'subset_size': P(),
                         'soft_weight': P()}))
    loss, parts = body(image, text, jnp.asarray(logit_scale, jnp.float32), subset,
                       jnp.asarray(alpha, jnp.float32),
                       jax.lax.stop_gradient(teacher.image), jax.lax.stop_gradient(teacher.text),
                       jax.lax.stop_gradient(jnp.asarray(teacher.logit_scale, jnp.float32)),
                       teacher.column_mask)
    parts['alpha'] = jnp.asarray(alpha, jnp.float32) if with_teacher else zero
    if not with_teacher:
        del parts['soft_weight']
    return loss, parts


def _check_psd_args(image, text, mesh, subset, teacher) -> None:
    """psd_loss's arrays checked (ValueError naming the one at fault); its settings were
    checked when their LossConfig was built."""
    _check_embeddings(image, text, mesh)
    if subset is not None and subset.shape != (image.shape[0],):
        raise ValueError(f'subset mask has shape {subset.shape}, expected ({image.shape[0]},)')
    if teacher is not None:
        for name, x in (('teacher.image', teacher.image), ('teacher.text', teacher.text)):
            if x.shape != image.shape:
                raise ValueError(f'{name} has shape {x.shape}, expected {image.shape}')


def _ring_tile(impl: str, tile: int, per_device: int) -> int | None:
    """The ring's tile width (loss.tile checked; its 0 means the whole per-device block), or
    None for the all_gather implementation, which has no tiles."""
    return ring.check_tile(tile, per_device) if impl == 'ring' else None


def clip_loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array, *, mesh: Mesh,
              config: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CLIP InfoNCE, both directions over the global batch: (B, D), (B, D), scalar -> loss;
    `config` gives impl, tile and precision (its PSD settings are not used)."""
    return psd_loss(image, text, logit_scale, mesh=mesh, config=config)


def _sigmoid(image, text, scale, bias, *, axes, n, tile, precision):
    b = image.shape[0]
    positives = _shard_offset(axes, b) + jnp.arange(b)
    if tile is not None:  # ring
        t = logit_scale_value(scale)
        if axes:  # every device's tiles use them: their gradients are summed over devices
            t, bias = (jax.lax.pcast(x, axes, to='varying') for x in (t, bias))
        total = ring.sigmoid_rows(axes, n, tile, precision)(image, text, t, bias, positives)
        return -_psum(total, axes) / (n * b)
    logits = _slab(image, _gather(text, axes), logit_scale_value(scale), precision) + bias
    labels = jnp.where(jnp.arange(logits.shape[1])[None, :] == positives[:, None], 1.0, -1.0)
    batch_size = logits.shape[1]
    loss = -_psum(jnp.sum(jax.nn.log_sigmoid(labels * logits)), axes) / batch_size
    return loss


def sigmoid_loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array,
                 logit_bias: jax.Array, *, mesh: Mesh, config: LossConfig
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP: -1/B sum_ij log sigmoid(z_ij (t u_i.v_j + bias)), z = +1 on pairs, -1 elsewhere.

    Each device scores its b images against all B captions (all_gather of the captions, or
    the captions circulating in b x tile tiles with config.impl='ring'); `config` gives impl,
    tile and precision.
    """
    _check_embeddings(image, text, mesh)
    impl, tile, precision = config.impl, config.tile, config.precision
    axes = shd.data_axes(mesh)
    rows = shd.batch_partition(mesh)
    n = shd.data_size(mesh)
    ring_tile = _ring_tile(impl, tile, image.shape[0] // n)
    loss = jax.shard_map(lambda *a: _sigmoid(*a, axes=axes, n=n, tile=ring_tile,
                                             precision=precision), mesh=mesh,
                         in_specs=(rows, rows, P(), P()), out_specs=P())(
        image, text, jnp.asarray(logit_scale, jnp.float32), jnp.asarray(logit_bias, jnp.float32))
    zero = jnp.zeros((), jnp.float32)
    return loss, {'sigmoid': loss, 'alpha': zero, 'subset_size': zero}
