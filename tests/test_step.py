"""The train step: three steps on 8 devices (FSDP-sharded parameters) equal three steps on one.

Both runs start from the same initial state (initialised once, then placed on each mesh) and
see the same batches; the subset and teacher are drawn from the state's RNG, identically on any
mesh. What is compared, and why these tolerances (measured over 8 seeds x 2 cases, worst seen
in brackets):
- After the first step (identical parameters before it): the gradient of every leaf, read from
  Adam's first moment (0.1 x the clipped gradient), within 1e-4 of the leaf's norm plus 1e-6 of
  the whole gradient's norm [2e-6 relative on every leaf that carries signal; leaves whose true
  gradient is zero, e.g. a bias before BatchNorm, hold rounding noise below 1e-6 of the whole];
  BatchNorm statistics within 1e-5 relative [1.1e-6]; every parameter within lr / 10 [2.8e-5].
- After three steps the two runs are no longer comparable element by element: Adam divides by
  sqrt(v) + eps, so an element whose gradient is within rounding of zero can take a step of up
  to lr in either direction, and in a tiny BatchNorm ResNet this chaos grows (seen: one element
  1.0e-3 apart, the L2 distance 2.5e-3 of the distance moved, for one seed in ten). So the
  bulk is checked: 99% of parameter (and EMA) elements within lr / 10 [8.1e-6], and the step
  metrics: loss and its parts to 1e-4 relative [6.7e-6], the gradient norm to 1e-5 at the first
  step [2.7e-7] and 1e-3 later [7.3e-5]. A sharding bug (a missing reduction, a wrong slice)
  breaks the first-step gradient check by orders of magnitude.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

from psd_jax import losses, schedules, sharding, step
from psd_jax.models import build_model, preset

B = 16
STEPS = 3
LR = 1e-3

TINY_RESNET = preset('tiny', image=dict(kind='resnet', layers=(1, 1, 1, 1), width=8, heads=2))

CASES = {
    # ViT towers, teacher = a second pass over a quarter of the batch (padded on 8 devices)
    'vit_second_pass': ('tiny', losses.LossConfig(teacher='second_pass', subset_fraction=0.25,
                                                  teacher_temperature=0.5)),
    # ResNet tower with BatchNorm, EMA teacher
    'resnet_ema': (TINY_RESNET, losses.LossConfig(teacher='ema', subset_fraction=0.5,
                                                  ema_momentum=0.9)),
}


def make_setup(spec, loss, mesh):
    lr = schedules.warmup_cosine(LR, total_steps=10, warmup_steps=1)
    return step.StepSetup(build_model(spec), step.make_optimizer(lr), loss,
                          schedules.alpha_schedule('constant', 0.5, 10), lr, mesh)


def batches(seed, context_length=16):
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        yield {'image': rng.standard_normal((B, 32, 32, 3)).astype(np.float32),
               'teacher_image': rng.standard_normal((B, 32, 32, 3)).astype(np.float32),
               'text': rng.integers(1, 1000, (B, context_length)).astype(np.int32)}


def put(batch, mesh):
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def run(setup, state, seed, strategy):
    """Three steps; returns the host copies of the state after the first and the last step, and
    every step's metrics."""
    shardings = step.state_shardings(setup, strategy)
    state = jax.device_put(state, shardings, may_alias=False)  # the step donates it
    example = next(batches(seed))
    fn = step.compile_train_step(setup, shardings, example)
    states, metrics = [], []
    for batch in batches(seed):
        state, m = fn(state, put(batch, setup.mesh))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states[0], states[-1], metrics


def leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def bulk_within(a, b, bound, what, seed):
    """99% of the elements of trees a and b within `bound` of each other."""
    diff = np.concatenate([np.abs(x - y).ravel() for x, y in zip(leaves(a), leaves(b))])
    assert np.quantile(diff, 0.99) <= bound, (
        f'{what}: 99th percentile {np.quantile(diff, 0.99):.3g} > {bound} (seed {seed})')


@pytest.mark.parametrize('case', list(CASES))
def test_eight_devices_match_one(devices, case):
    spec, loss = CASES[case]
    one = make_setup(spec, loss, sharding.make_mesh({'data': 1}, devices[:1]))
    eight = make_setup(spec, loss, sharding.make_mesh({'data': 2, 'fsdp': 4}, devices))
    initial = jax.device_get(step.init_state(one, jax.random.key(1)))
    seed = int(np.random.SeedSequence().entropy % 2**32)
    first1, s1, m1 = run(one, initial, seed, 'replicated')
    initial = jax.device_get(step.init_state(one, jax.random.key(1)))  # fresh: the key is donated
    first8, s8, m8 = run(eight, initial, seed, 'fsdp')
    assert int(s1.step) == int(s8.step) == STEPS

    # after one step from identical parameters: gradients, BatchNorm statistics, parameters
    mu1, mu8 = (optax.tree_utils.tree_get(s.opt_state, 'mu') for s in (first1, first8))
    whole = np.sqrt(sum(np.sum(x ** 2) for x in leaves(mu1)))
    assert whole > 0
    for (path, _), a, b in zip(jax.tree_util.tree_leaves_with_path(mu1), leaves(mu1),
                               leaves(mu8)):
        err = np.linalg.norm(a - b)
        assert err <= 1e-4 * np.linalg.norm(a) + 1e-6 * whole, (
            f'gradient of {jax.tree_util.keystr(path)}: |8 dev - 1 dev| = {err:.3g}, '
            f'|grad| = {np.linalg.norm(a):.3g} (seed {seed})')
    for a, b in zip(leaves(first1.batch_stats), leaves(first8.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(first1.params),
                            leaves(first8.params)):
        err = np.max(np.abs(np.asarray(a) - b))
        assert err <= LR / 10, f'{jax.tree_util.keystr(path)} differs by {err:.3g} (seed {seed})'

    # after three steps: the bulk of the parameters, and every step's metrics
    moved = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(leaves(initial.params),
                                                              leaves(s1.params))))
    assert moved > 1e-2, 'the parameters did not move: the comparison would be vacuous'
    bulk_within(s1.params, s8.params, LR / 10, 'parameters after three steps', seed)
    if s1.ema_params is not None:
        bulk_within(s1.ema_params, s8.ema_params, LR / 10, 'EMA parameters', seed)
    for i, (a, b) in enumerate(zip(m1, m8)):
        assert a['subset_size'] == b['subset_size'] == round(B * loss.subset_fraction)
        for key in ('loss', 'clip', 'distill'):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4,
                                       err_msg=f'{key} at step {i} (seed {seed})')
        np.testing.assert_allclose(a['grad_norm'], b['grad_norm'], rtol=1e-5 if i == 0 else 1e-3,
                                   err_msg=f'grad_norm at step {i} (seed {seed})')


@pytest.mark.parametrize('fraction', [0.25, 0.0])
def test_second_pass_teacher_is_a_forward_over_the_subset(devices, fraction):
    """The teacher pass embeds exactly the subset's items (padded to whole shards, padding
    dropped) on the teacher view, with the model's parameters, and nothing else."""
    loss = losses.LossConfig(teacher='second_pass', subset_fraction=fraction,
                             teacher_temperature=0.5)
    setup = make_setup('tiny', loss, sharding.make_mesh({'data': 8}, devices))
    state = step.init_state(setup, jax.random.key(2))
    batch = put(next(batches(int(np.random.SeedSequence().entropy % 2**32))), setup.mesh)
    idx = losses.subset_indices(jax.random.key(3), B, fraction)

    @jax.jit
    def run(state, batch, idx):
        teacher = step._teacher(setup, state, batch, idx, B)
        full = setup.model.apply({'params': state.params}, batch['teacher_image'],
                                 batch['text'])
        return teacher, full

    teacher, full = jax.device_get(run(state, batch, idx))
    idx = np.asarray(idx)
    assert idx.size == round(B * fraction)
    mask = np.zeros(B, bool)
    mask[idx] = True
    np.testing.assert_array_equal(teacher.column_mask, mask)
    np.testing.assert_allclose(teacher.image[idx], full['image'][idx], atol=2e-6)
    np.testing.assert_allclose(teacher.text[idx], full['text'][idx], atol=2e-6)
    assert not np.any(teacher.image[~mask]) and not np.any(teacher.text[~mask])
    assert float(teacher.logit_scale) == pytest.approx(float(full['logit_scale']))


def plain_first_step(setup, fn, state, batch):
    """The first step of a teacher with nothing from earlier steps (bank, previous step): plain
    CLIP. Returns the new state, and the parameters and model outputs before the step (what
    the teacher keeps)."""
    params0 = jax.device_get(state.params)
    out0 = jax.device_get(setup.model.apply({'params': params0}, batch['image'], batch['text']))
    state, metrics = fn(state, put(batch, setup.mesh))
    metrics = jax.device_get(metrics)
    assert metrics['subset_size'] == 0 and metrics['distill'] == 0
    np.testing.assert_allclose(metrics['loss'], metrics['clip'], rtol=1e-6)
    return state, params0, out0


def test_bank_teacher_distils_from_each_pairs_last_visit(devices):
    """psd.teacher='bank': a pair's first visit keeps one-hot targets and writes its embeddings
    into the bank; a later visit distils from those (the teacher's columns are the pairs the
    bank has seen), with the student's current scale. Checked against psd_loss given the same
    teacher explicitly, on 8 devices."""
    n_pairs = 40
    loss = losses.LossConfig(teacher='bank', subset_fraction=0.5, teacher_temperature=1.0)
    mesh = sharding.make_mesh({'data': 8}, devices)
    lr = schedules.warmup_cosine(1e-3, total_steps=10, warmup_steps=1)
    setup = step.StepSetup(build_model('tiny'), step.make_optimizer(lr), loss,
                           schedules.alpha_schedule('constant', 0.5, 10), lr, mesh, n_pairs)
    with pytest.raises(ValueError, match='bank_size'):
        dataclasses.replace(setup, bank_size=0)
    shardings = step.state_shardings(setup)
    state = step.init_state(setup, jax.random.key(4))
    seed = int(np.random.SeedSequence().entropy % 2**32)
    first, second = list(batches(seed))[:2]
    first['index'] = np.arange(B, dtype=np.int32)                  # pairs 0-15
    second['index'] = np.arange(B // 2, B // 2 + B, dtype=np.int32)  # 8-15 again, 16-23 new
    fn = step.compile_train_step(setup, shardings, first)
    state, params0, out0 = plain_first_step(setup, fn, state, first)
    bank = jax.device_get(state.bank)
    np.testing.assert_array_equal(bank['seen'], np.arange(n_pairs) < B)
    np.testing.assert_allclose(bank['image'][:B], out0['image'], atol=2e-6)
    np.testing.assert_allclose(bank['text'][:B], out0['text'], atol=2e-6)
    assert not np.any(bank['image'][B:])

    params1 = jax.device_get(state.params)
    step_rng = jax.random.fold_in(jax.device_get(state.rng), 1)
    subset = np.asarray(losses.subset_mask(losses.subset_indices(step_rng, B, 0.5), B))
    seen = bank['seen'][second['index']]
    teacher = losses.Teacher(bank['image'][second['index']], bank['text'][second['index']],
                             params1['logit_scale'], seen)
    out1 = setup.model.apply({'params': params1}, second['image'], second['text'])
    want, parts = losses.psd_loss(out1['image'], out1['text'], out1['logit_scale'], mesh=mesh,
                                  subset=subset & seen, alpha=0.5, teacher=teacher)
    state, m2 = fn(state, put(second, mesh))
    m2 = jax.device_get(m2)
    assert m2['subset_size'] == np.sum(subset & seen) > 0
    np.testing.assert_allclose(m2['loss'], want, rtol=1e-5)
    np.testing.assert_allclose(m2['distill'], parts['distill'], rtol=1e-5)
    assert m2['loss'] != pytest.approx(m2['clip'], rel=1e-4)  # the teacher changed the loss
    np.testing.assert_array_equal(jax.device_get(state.bank['seen']),
                                  np.arange(n_pairs) < B + B // 2)


def test_previous_step_teacher_distils_among_the_repeated_pairs(devices):
    """psd.teacher='previous_step' (DLB): the first k = B/4 pairs of a batch repeat slots
    [k, 2k) of the previous batch, and the previous step's embeddings (and scale) of them are
    the teacher among them. Step 1 has nothing carried (plain CLIP); step 2 equals psd_loss
    given that teacher explicitly (embeddings from an independent forward with step 1's
    parameters); step 3's carried slots do not match the kept indices, so it is plain CLIP."""
    k = B // 4
    loss = losses.LossConfig(teacher='previous_step', subset_fraction=0.25,
                             teacher_temperature=1.0)
    mesh = sharding.make_mesh({'data': 8}, devices)
    lr = schedules.warmup_cosine(1e-3, total_steps=10, warmup_steps=1)
    setup = step.StepSetup(build_model('tiny'), step.make_optimizer(lr), loss,
                           schedules.alpha_schedule('constant', 0.5, 10), lr, mesh,
                           carried=loss.carried_pairs(B))
    assert setup.carried == k
    shardings = step.state_shardings(setup)
    state = step.init_state(setup, jax.random.key(5))
    seed = int(np.random.SeedSequence().entropy % 2**32)
    first, second, third = batches(seed)
    first['index'] = np.arange(100, 100 + B, dtype=np.int32)
    second['index'] = np.concatenate([first['index'][k:2 * k],
                                      np.arange(200, 200 + B - k)]).astype(np.int32)
    third['index'] = np.arange(300, 300 + B, dtype=np.int32)
    fn = step.compile_train_step(setup, shardings, first)
    state, params0, out0 = plain_first_step(setup, fn, state, first)
    carry = jax.device_get(state.carry)
    np.testing.assert_array_equal(carry['index'], first['index'][k:2 * k])
    np.testing.assert_allclose(carry['image'], out0['image'][k:2 * k], atol=2e-6)
    np.testing.assert_allclose(carry['text'], out0['text'][k:2 * k], atol=2e-6)
    assert float(carry['logit_scale']) == pytest.approx(float(params0['logit_scale']))

    params1 = jax.device_get(state.params)
    mask = np.arange(B) < k
    rows = lambda x: np.concatenate([x[k:2 * k], np.zeros((B - k, x.shape[1]))])  # noqa: E731
    teacher = losses.Teacher(rows(out0['image']).astype(np.float32),
                             rows(out0['text']).astype(np.float32), params0['logit_scale'], mask)
    out1 = setup.model.apply({'params': params1}, second['image'], second['text'])
    want, parts = losses.psd_loss(out1['image'], out1['text'], out1['logit_scale'], mesh=mesh,
                                  subset=mask, alpha=0.5, teacher=teacher)
    state, m2 = fn(state, put(second, mesh))
    m2 = jax.device_get(m2)
    assert m2['subset_size'] == k
    np.testing.assert_allclose(m2['loss'], want, rtol=1e-5)
    np.testing.assert_allclose(m2['distill'], parts['distill'], rtol=1e-5)
    assert m2['loss'] != pytest.approx(m2['clip'], rel=1e-4)  # the teacher changed the loss

    state, m3 = fn(state, put(third, mesh))
    m3 = jax.device_get(m3)
    assert m3['subset_size'] == 0
    np.testing.assert_allclose(m3['loss'], m3['clip'], rtol=1e-6)

    with pytest.raises(ValueError, match='fraction <= 0.5'):
        losses.LossConfig(teacher='previous_step', subset_fraction=0.75)
    with pytest.raises(ValueError, match='repeats 4'):
        step.compile_train_step(dataclasses.replace(setup, carried=3), shardings, first)
    with pytest.raises(ValueError, match="needs batch\\['index'\\]"):
        step.compile_train_step(setup, shardings, {k: first[k] for k in ('image', 'text')})
