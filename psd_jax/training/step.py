"""The train state, its sharded initialisation, and the pure train step.

`train_step(setup, state, batch) -> (state, metrics)` is a module-level pure function;
`compile_train_step` jits it once with explicit in/out shardings and the state donated.
`batch_spec(setup, global_batch)` is the batch a step takes: 'image' and 'text' always,
'teacher_image' for the second-pass / EMA teachers, 'index' for the bank / previous-step
teachers (psd_jax/training/batch.py has the shapes and dtypes; docs/design.md the why).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from psd_jax import losses, sharding as shd
from psd_jax.models.clip import clip_logit_scale, logit_scale_value
from psd_jax.training import accumulate, batch as batch_lib, guard

NO_DECAY_LEAVES = ('bias', 'scale', 'logit_scale', 'logit_bias', 'class_embedding')


class TrainState(struct.PyTreeNode):
    """Everything a step changes. ema_params is None unless the teacher is 'ema'; bank is None
    unless the teacher is 'bank', else {'image': (N, D), 'text': (N, D), 'seen': (N,) bool}:
    every dataset pair's embeddings from its last visit (replicated: N x D x 8 bytes/device).
    carry is None unless the teacher is 'previous_step', else {'image': (k, D), 'text': (k, D),
    'index': (k,) int32 (-1 before the first step), 'logit_scale': ()}: the last step's
    embeddings of the k pairs the next batch repeats. health: the non-finite guard's counters
    (psd_jax/training/guard.py)."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    bank: Any = None
    carry: Any = None
    health: Any = None


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """The static parts of a train step: model, optimizer, loss and schedules, mesh."""
    model: nn.Module
    tx: optax.GradientTransformation
    loss: losses.LossConfig
    alpha_fn: Callable
    lr_fn: Callable
    mesh: Mesh
    bank_size: int = 0  # dataset size N, for the embedding-bank teacher
    # pairs per global batch repeated from the previous one (previous-step teacher)
    repeated_pairs: int = 0
    # GradCache accumulation over k micro-batches (psd_jax/training/accumulate.py)
    micro_batches: int = 1
    max_update_ratio: float = 1.0  # a larger update-to-parameter norm ratio is skipped (guard)

    def __post_init__(self):
        if self.loss.needs_bank and self.bank_size <= 0:
            raise ValueError("psd.teacher='bank' needs the dataset size (StepSetup.bank_size) "
                             'to size the embedding bank')
        if self.repeated_pairs and not self.loss.needs_carry:
            raise ValueError("StepSetup.repeated_pairs is only for psd.teacher='previous_step'")


def weight_decay_mask(params: Any) -> Any:
    """True where AdamW decays: matrices and embeddings; not gains, biases or the logit scale."""
    def decays(path, leaf):
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        return bool(keys) and keys[-1] not in NO_DECAY_LEAVES and leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(lr_fn: Callable, weight_decay: float = 0.2, b1: float = 0.9,
                   b2: float = 0.98, eps: float = 1e-6,
                   grad_clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW (CLIP's betas and epsilon) with decay masked off gains/biases/logit scale, after
    clipping the global gradient norm to `grad_clip_norm` (None: no clipping)."""
    parts = [] if grad_clip_norm is None else [optax.clip_by_global_norm(grad_clip_norm)]
    parts.append(optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=weight_decay_mask))
    return optax.chain(*parts)


def batch_spec(setup: StepSetup, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch `train_step` takes for this setup: keys, shapes and dtypes."""
    return batch_lib.with_extras(batch_lib.input_spec(setup.model, global_batch),
                                 teacher_image=setup.loss.needs_teacher_forward,
                                 index=setup.loss.needs_index)


def _dummy_inputs(model: nn.Module) -> tuple[jax.Array, jax.Array]:
    spec = batch_lib.input_spec(model, 1)
    return tuple(jnp.zeros(spec[k].shape, spec[k].dtype) for k in ('image', 'text'))


def _create_state(setup: StepSetup, rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables = nn.meta.unbox(setup.model.init(init_rng, *_dummy_inputs(setup.model)))
    params = variables['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}), opt_state=setup.tx.init(params),
        ema_params=params if setup.loss.teacher == 'ema' and setup.loss.kind == 'psd' else None,
        rng=state_rng, bank=_empty_bank(setup) if setup.loss.needs_bank else None,
        carry=_empty_carry(setup) if setup.loss.needs_carry else None,
        health=guard.initial_health())


def _empty_bank(setup: StepSetup) -> dict:
    dim = setup.model.image_tower.embed_dim
    zeros = jnp.zeros((setup.bank_size, dim), jnp.float32)
    return {'image': zeros, 'text': zeros, 'seen': jnp.zeros((setup.bank_size,), bool)}


def _empty_carry(setup: StepSetup) -> dict:
    k = setup.repeated_pairs
    zeros = jnp.zeros((k, setup.model.image_tower.embed_dim), jnp.float32)
    return {'image': zeros, 'text': zeros, 'index': jnp.full((k,), -1, jnp.int32),
            'logit_scale': jnp.zeros((), jnp.float32)}


def state_shardings(setup: StepSetup, strategy: str = 'replicated') -> TrainState:
    """NamedShardings for every leaf of the train state (parameters placed by `strategy`)."""
    mesh = setup.mesh
    boxed = jax.eval_shape(setup.model.init, jax.random.key(0), *_dummy_inputs(setup.model))
    var_sh = shd.param_shardings(boxed, mesh, strategy)
    params_sh = var_sh['params']
    abstract = jax.eval_shape(functools.partial(_create_state, setup), jax.random.key(0))
    opt_sh = optax.tree_utils.tree_map_params(
        setup.tx, lambda _, s: s, abstract.opt_state, params_sh,
        transform_non_params=lambda _: shd.replicated(mesh))
    return TrainState(step=shd.replicated(mesh), params=params_sh,
                      batch_stats=var_sh.get('batch_stats', {}), opt_state=opt_sh,
                      ema_params=params_sh if abstract.ema_params is not None else None,
                      rng=shd.replicated(mesh),
                      bank=None if abstract.bank is None else jax.tree.map(
                          lambda _: shd.replicated(mesh), abstract.bank),
                      carry=None if abstract.carry is None else jax.tree.map(
                          lambda _: shd.replicated(mesh), abstract.carry),
                      health=jax.tree.map(lambda _: shd.replicated(mesh), abstract.health))


def abstract_state(setup: StepSetup, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs of the train state carrying `shardings` (to compile or restore into)."""
    shapes = jax.eval_shape(functools.partial(_create_state, setup), jax.random.key(0))
    return jax.tree.map(lambda sh, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        shardings, shapes)


def init_state(setup: StepSetup, rng: jax.Array, strategy: str = 'replicated') -> TrainState:
    """Initialise the train state directly into its sharding (no host copy of the parameters)."""
    shardings = state_shardings(setup, strategy)
    return jax.jit(functools.partial(_create_state, setup), out_shardings=shardings)(rng)


def _forward_teacher(setup: StepSetup, state: TrainState, batch: dict, indices: jax.Array,
                     batch_size: int) -> losses.Teacher:
    """Teacher embeddings of a stop-gradient forward over the subset (second_pass / ema): the
    subset's `batch['teacher_image']` and captions through the current (second_pass) or EMA
    parameters, scattered into (B, D) rows; the other rows are zero and masked."""
    k = indices.shape[0]
    mask = losses.subset_mask(indices, batch_size)
    params = state.ema_params if setup.loss.teacher == 'ema' else state.params
    dim = setup.model.image_tower.embed_dim
    if k == 0:
        empty = jnp.zeros((batch_size, dim), jnp.float32)
        return losses.Teacher(empty, empty, params['logit_scale'], mask)
    n, m = shd.data_size(setup.mesh), setup.micro_batches
    padded = math.ceil(k / (n * m)) * n * m  # whole shards per micro-batch; padding dropped
    idx = jnp.concatenate([indices, jnp.broadcast_to(indices[:1], (padded - k,))])
    variables = {'params': params, 'batch_stats': state.batch_stats}

    def forward(pair):  # running BN statistics; one micro-batch of activations at a time
        images, texts = (jax.lax.with_sharding_constraint(x, shd.batch_sharding(setup.mesh))
                         for x in pair)
        out = setup.model.apply(variables, images, texts, train=False)
        return out['image'], out['text']

    pair = (batch['teacher_image'][idx], batch['text'][idx])
    if m == 1:
        image, text = forward(pair)
    else:
        image, text = jax.lax.map(forward, tuple(accumulate.split(x, m, n) for x in pair))
        image, text = accumulate.merge(image, n), accumulate.merge(text, n)
    out = jax.lax.stop_gradient({'image': image, 'text': text,
                                 'logit_scale': params['logit_scale']})

    def scatter(x):
        return jnp.zeros((batch_size, dim), jnp.float32).at[indices].set(x[:k])

    return losses.Teacher(scatter(out['image']), scatter(out['text']), out['logit_scale'], mask)


def _bank_teacher(state: TrainState, batch: dict,
                  subset: jax.Array) -> tuple[losses.Teacher, jax.Array]:
    """The bank's embeddings of this batch's pairs as the teacher, with the student's current
    (stop-gradient) scale; returns it and `subset` (B,) restricted to pairs seen before."""
    index = batch['index']
    seen = state.bank['seen'][index]
    teacher = losses.Teacher(state.bank['image'][index], state.bank['text'][index],
                             jax.lax.stop_gradient(state.params['logit_scale']), seen)
    return teacher, subset & seen


def _previous_step_teacher(state: TrainState, batch: dict,
                           batch_size: int) -> tuple[losses.Teacher, jax.Array]:
    """The last step's embeddings of the k pairs this batch repeats (its first k slots) as the
    teacher among them; returns it and the (B,) subset: the first k slots whose dataset index
    matches the kept one (none at step 0, or if the data does not line up)."""
    carry = state.carry
    k = carry['index'].shape[0]
    mask = jnp.zeros((batch_size,), bool).at[:k].set(batch['index'][:k] == carry['index'])

    def rows(x):
        return jnp.zeros((batch_size, x.shape[1]), jnp.float32).at[:k].set(x)

    return losses.Teacher(rows(carry['image']), rows(carry['text']), carry['logit_scale'],
                          mask), mask


def _next_carry(carry: dict, batch: dict, out: dict, logit_scale: jax.Array) -> dict:
    """Keep this step's (stop-gradient) embeddings of slots [k, 2k), which the next batch
    repeats in its first k slots."""
    k = carry['index'].shape[0]
    image, text = (jax.lax.stop_gradient(out[n][k:2 * k]).astype(jnp.float32)
                   for n in ('image', 'text'))
    return {'image': image, 'text': text, 'index': batch['index'][k:2 * k],
            'logit_scale': jax.lax.stop_gradient(logit_scale).astype(jnp.float32)}


def _update_bank(bank: dict, index: jax.Array, out: dict) -> dict:
    """Write this step's (stop-gradient) embeddings of the batch's pairs into the bank."""
    image, text = (jax.lax.stop_gradient(out[k]).astype(jnp.float32) for k in ('image', 'text'))
    return {'image': bank['image'].at[index].set(image), 'text': bank['text'].at[index].set(text),
            'seen': bank['seen'].at[index].set(True)}


def compute_loss(setup: StepSetup, out: dict, teacher: losses.Teacher | None,
                 subset: jax.Array | None, alpha: jax.Array) -> tuple[jax.Array, dict]:
    """Dispatch on the loss kind. out: the model's outputs for the batch; subset: (B,) bool."""
    cfg, mesh = setup.loss, setup.mesh
    if cfg.kind == 'sigmoid':
        return losses.sigmoid_loss(out['image'], out['text'], out['logit_scale'],
                                   out['logit_bias'], mesh=mesh, config=cfg)
    if cfg.kind == 'clip':
        return losses.clip_loss(out['image'], out['text'], out['logit_scale'], mesh=mesh,
                                config=cfg)
    return losses.psd_loss(out['image'], out['text'], out['logit_scale'], mesh=mesh, config=cfg,
                           subset=subset, alpha=alpha, teacher=teacher)


def _loss_and_grads(setup: StepSetup, state: TrainState, batch: dict,
                    teacher: losses.Teacher | None, subset: jax.Array | None,
                    alpha: jax.Array, rng: jax.Array) -> tuple[tuple[jax.Array, tuple], Any]:
    """((loss, (loss parts, mutated batch_stats, {'image', 'text'} embeddings)), gradients) of
    the global batch: one forward and backward, or GradCache over setup.micro_batches. rng:
    the training forward's randomness (patch dropout; one key per micro-batch)."""
    has_bn = bool(state.batch_stats)

    def apply(params, images, texts, key):
        variables = {'params': params, 'batch_stats': state.batch_stats}
        rngs = {'dropout': key}
        if has_bn:
            return setup.model.apply(variables, images, texts, train=True, rngs=rngs,
                                     mutable=['batch_stats'])
        return setup.model.apply(variables, images, texts, train=True, rngs=rngs), {}

    if setup.micro_batches > 1:
        n = shd.data_size(setup.mesh)
        accumulate.check_micro_batches(setup.micro_batches, batch['image'].shape[0] // n, has_bn)

        def embed(params, micro):
            images, texts = (jax.lax.with_sharding_constraint(
                micro[key], shd.batch_sharding(setup.mesh)) for key in ('image', 'text'))
            return apply(params, images, texts, micro['rng'])[0]

        (loss, parts), grads, full = accumulate.grads(
            embed, state.params, batch,
            lambda out: compute_loss(setup, out, teacher, subset, alpha),
            setup.micro_batches, n, rng)
        return (loss, (parts, {}, full)), grads

    def loss_fn(params):
        out, mutated = apply(params, batch['image'], batch['text'], rng)
        loss, parts = compute_loss(setup, out, teacher, subset, alpha)
        return loss, (parts, mutated, {'image': out['image'], 'text': out['text']})

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


def train_step(setup: StepSetup, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimisation step on a global batch. Pure: the same inputs give the same outputs."""
    with shd.activation_rules(setup.mesh):
        return _train_step(setup, state, batch)


def _train_step(setup: StepSetup, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    batch_size = batch['image'].shape[0]
    batch_lib.check(batch, batch_spec(setup, batch_size), 'train_step batch')
    step_rng = jax.random.fold_in(state.rng, state.step)
    alpha = setup.alpha_fn(state.step)
    indices, subset, teacher = None, None, None
    if setup.loss.kind == 'psd':
        indices = losses.subset_indices(step_rng, batch_size, setup.loss.subset_fraction)
        subset = losses.subset_mask(indices, batch_size)
        if setup.loss.needs_bank:
            teacher, subset = _bank_teacher(state, batch, subset)
        elif setup.loss.needs_carry:
            if setup.repeated_pairs != setup.loss.repeated_pairs(batch_size):
                raise ValueError(f'StepSetup.repeated_pairs={setup.repeated_pairs}, but a global '
                                 f'batch of {batch_size} repeats '
                                 f'{setup.loss.repeated_pairs(batch_size)}')
            teacher, subset = _previous_step_teacher(state, batch, batch_size)
        elif setup.loss.needs_teacher_forward:
            teacher = _forward_teacher(setup, state, batch, indices, batch_size)
    (loss, (parts, mutated, embeddings)), grads = _loss_and_grads(
        setup, state, batch, teacher, subset, alpha, jax.random.fold_in(step_rng, 1))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    param_norm = optax.tree.norm(state.params)
    ratio = optax.tree.norm(updates) / jnp.maximum(param_norm, 1e-12)
    finite = guard.is_finite(loss, grad_norm)
    applied = guard.may_apply(finite, ratio, setup.max_update_ratio)
    new_state = jax.lax.cond(  # a skipped step is not applied (only the kept branch copies)
        applied, lambda: _apply_update(setup, state, batch, updates, opt_state, mutated,
                                       embeddings),
        lambda: state.replace(step=state.step + 1))
    new_state = new_state.replace(health=guard.count_skips(state.health, applied))
    params = new_state.params
    metrics = {'loss': loss, **parts, 'learning_rate': setup.lr_fn(state.step),
               'grad_norm': grad_norm, 'param_norm': param_norm, 'update_ratio': ratio,
               'logit_scale': logit_scale_value(params['logit_scale']),
               'skipped': 1.0 - applied.astype(jnp.float32),
               'skipped_in_a_row': new_state.health['skipped_in_a_row'].astype(jnp.float32),
               'skipped_total': new_state.health['skipped_total'].astype(jnp.float32)}
    return new_state, metrics


def _apply_update(setup: StepSetup, state: TrainState, batch: dict, updates: Any,
                  opt_state: Any, mutated: dict, embeddings: dict) -> TrainState:
    """The state after the optimizer's `updates` (and its new `opt_state`) are applied (and the
    EMA, bank and carry advance)."""
    params = optax.apply_updates(state.params, updates)
    params = {**params, 'logit_scale': clip_logit_scale(params['logit_scale'])}
    ema = state.ema_params
    if ema is not None:
        m = setup.loss.ema_momentum
        ema = jax.tree.map(lambda e, p: m * e + (1 - m) * p, ema, params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         batch_stats=mutated.get('batch_stats', state.batch_stats),
                         ema_params=ema, bank=None if state.bank is None else
                         _update_bank(state.bank, batch['index'], embeddings),
                         carry=None if state.carry is None else _next_carry(
                             state.carry, batch, embeddings, state.params['logit_scale']))


def compile_train_step(setup: StepSetup, shardings: TrainState, batch_example: dict):
    """jit `train_step` once: state sharded as `shardings` and donated, batch over the data axes,
    metrics replicated. Returns the AOT-compiled function (its `memory_analysis()` is
    available) for batches shaped like `batch_example` (arrays or ShapeDtypeStructs)."""
    batch_lib.check(batch_example, batch_spec(setup, batch_example['image'].shape[0]),
                    'compile_train_step batch')
    shd.check_batch(batch_example['image'].shape[0], setup.mesh, 'global batch')
    batch_sh = {k: shd.batch_sharding(setup.mesh) for k in batch_example}
    jitted = jax.jit(functools.partial(train_step, setup), in_shardings=(shardings, batch_sh),
                     out_shardings=(shardings, shd.replicated(setup.mesh)), donate_argnums=0)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
                      for k, v in batch_example.items()}
    return jitted.lower(abstract_state(setup, shardings), abstract_batch).compile()
