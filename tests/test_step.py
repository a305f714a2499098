"""The train step for every loss kind (CLIP, sigmoid, PSD with each teacher) and every
parameter sharding (replicated, fsdp, fsdp_tp), on 8 devices whose fsdp (and model) axes really
have several devices, equals the same three steps on one device.

Both runs start from the same initial state (initialised once, then placed on each mesh) and
see the same batches; the subset and teacher are drawn from the state's RNG, identically on any
mesh. What is compared, and why these tolerances (worst seen over 10 seeds of every case in
brackets):
- After the first step (identical parameters before it): the gradient of every leaf, read from
  Adam's first moment (0.1 x the clipped gradient), within 1e-4 of the leaf's norm plus 1e-6 of
  the whole gradient's norm [7.2e-6 relative on every leaf that carries signal; leaves
  whose true gradient is zero, e.g. a bias before BatchNorm, hold rounding noise below 1e-6 of
  the whole]; BatchNorm statistics within 1e-5 relative; every parameter within lr / 10.
- After three steps the two runs are no longer comparable element by element: Adam divides by
  sqrt(v) + eps, so an element whose gradient is within rounding of zero can take a step of up
  to lr in either direction, and in a tiny BatchNorm ResNet this chaos grows. So the bulk is
  checked: 99% of parameter (and EMA) elements within lr / 10 [3.7e-7], and every step
  metric: the loss and its parts to 1e-4 relative [1.1e-5], the gradient norm to 1e-5 at
  the first step [1.8e-6] and 1e-3 later [3.9e-5]. The worst cases are the BatchNorm ResNet's;
  the ViT cases stay below 5e-6 on every measure. A sharding bug (a missing reduction, a wrong
  slice) breaks the first-step gradient check by orders of magnitude.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

from psd_jax.training import batch as batch_lib
from psd_jax import losses, sharding
from psd_jax.training import schedules, step
from psd_jax.models import build_model, preset

B = 16
STEPS = 3
LR = 1e-3
N_PAIRS = 24  # dataset size for the bank teacher: every batch revisits some pairs

TINY_RESNET = preset('tiny', image=dict(kind='resnet', layers=(1, 1, 1, 1), width=8, heads=2))
MESHES = {'data2_fsdp4': {'data': 2, 'fsdp': 4},
          'data2_fsdp2_model2': {'data': 2, 'fsdp': 2, 'model': 2}}

# name -> (model, loss, parameter sharding, 8-device mesh). Every loss kind and teacher, every
# sharding strategy; fsdp_tp and replicated on the mesh with a model axis.
CASES = {
    'clip/fsdp_tp': ('tiny', losses.LossConfig(kind='clip'), 'fsdp_tp', 'data2_fsdp2_model2'),
    'sigmoid/fsdp': ('tiny', losses.LossConfig(kind='sigmoid'), 'fsdp', 'data2_fsdp4'),
    'psd_same_pass/replicated': ('tiny', losses.LossConfig(teacher='same_pass'), 'replicated',
                                 'data2_fsdp2_model2'),
    # a second pass over a quarter of the batch (padded to whole shards on 8 devices)
    'psd_second_pass/fsdp': ('tiny', losses.LossConfig(
        teacher='second_pass', subset_fraction=0.25, teacher_temperature=0.5), 'fsdp',
        'data2_fsdp4'),
    # ResNet tower with BatchNorm
    'psd_ema_resnet/fsdp': (TINY_RESNET, losses.LossConfig(teacher='ema', ema_momentum=0.9),
                            'fsdp', 'data2_fsdp4'),
    'psd_ema/fsdp_tp': ('tiny', losses.LossConfig(teacher='ema'), 'fsdp_tp',
                        'data2_fsdp2_model2'),
    'psd_bank/fsdp_tp': ('tiny', losses.LossConfig(teacher='bank', teacher_temperature=1.0),
                         'fsdp_tp', 'data2_fsdp2_model2'),
    # the ring loss (b x 2 tiles) inside the step
    'psd_ema_ring/fsdp_tp': ('tiny', losses.LossConfig(teacher='ema', impl='ring', tile=2),
                             'fsdp_tp', 'data2_fsdp2_model2'),
    'psd_previous_step/fsdp': ('tiny', losses.LossConfig(teacher='previous_step',
                                                         subset_fraction=0.25), 'fsdp',
                               'data2_fsdp4'),
}


def make_setup(spec, loss, mesh):
    lr = schedules.warmup_cosine(LR, total_steps=10, warmup_steps=1)
    return step.StepSetup(build_model(spec, sigmoid=loss.kind == 'sigmoid'),
                          step.make_optimizer(lr), loss,
                          schedules.alpha_schedule('constant', 0.5, 10), lr, mesh,
                          bank_size=N_PAIRS if loss.needs_bank else 0,
                          repeated_pairs=loss.repeated_pairs(B))


def batches(setup, seed):
    """STEPS host batches shaped by step.batch_spec. Dataset indices (when the step takes
    them) revisit pairs: for the bank teacher B of N_PAIRS pairs per step; for the previous-step
    teacher the first k slots repeat the previous batch's slots [k, 2k)."""
    rng = np.random.default_rng(seed)
    spec = step.batch_spec(setup, B)
    out = []
    for i in range(STEPS):
        batch = batch_lib.synthetic(spec, rng, dataset_size=N_PAIRS)
        if setup.repeated_pairs:
            k = setup.repeated_pairs
            batch['index'] = np.arange(100 * i, 100 * i + B, dtype=np.int32)
            if out:
                batch['index'][:k] = out[-1]['index'][k:2 * k]
        out.append(batch)
    return out


def put(batch, mesh):
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def run(setup, state, seed, strategy):
    """Three steps; returns the state after the first step (host copy), the state after the
    last (on the devices), and every step's metrics."""
    shardings = step.state_shardings(setup, strategy)
    state = jax.device_put(state, shardings, may_alias=False)  # the step donates it
    fn = step.compile_train_step(setup, shardings, step.batch_spec(setup, B))
    first, metrics = None, []
    for batch in batches(setup, seed):
        state, m = fn(state, put(batch, setup.mesh))
        first = first or jax.device_get(state)
        metrics.append(jax.device_get(m))
    return first, state, metrics


def leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def bulk_within(a, b, bound, what):
    """99% of the elements of trees a and b within `bound` of each other."""
    diff = np.concatenate([np.abs(x - y).ravel() for x, y in zip(leaves(a), leaves(b))])
    assert np.quantile(diff, 0.99) <= bound, (
        f'{what}: 99th percentile {np.quantile(diff, 0.99):.3g} > {bound}')


def sharded_fraction(tree, axis):
    """Fraction of the tree's elements in leaves split over mesh axis `axis`, checked on the
    arrays themselves: each device holds 1 / (axis size) of such a leaf."""
    total = split = 0
    for x in jax.tree.leaves(tree):
        spec = [a for entry in x.sharding.spec if entry
                for a in (entry if isinstance(entry, tuple) else (entry,))]
        total += x.size
        if axis in spec:
            assert x.addressable_shards[0].data.size * x.sharding.mesh.shape[axis] <= x.size
            split += x.size
    return split / total


def check_placement(state, strategy):
    """The parameters, optimizer moments and EMA parameters are really sharded as asked."""
    fsdp, model = (sharded_fraction(state.params, a) for a in ('fsdp', 'model'))
    if strategy == 'replicated':
        assert fsdp == model == 0.0
    else:
        assert fsdp > 0.9, f'only {fsdp:.0%} of the parameters are split over fsdp'
        assert (model > 0.5) == (strategy == 'fsdp_tp'), f'{model:.0%} split over model'
    mu = optax.tree_utils.tree_get(state.opt_state, 'mu')
    assert sharded_fraction(mu, 'fsdp') == fsdp
    if state.ema_params is not None:
        assert sharded_fraction(state.ema_params, 'fsdp') == fsdp


def first_gradients_match(first_a, first_b, what):
    """The first step's gradients (Adam's first moment after one step: (1 - b1) g) per leaf
    within 1e-4 of the leaf's norm plus 1e-6 of the whole gradient's."""
    mu_a, mu_b = (optax.tree_utils.tree_get(s.opt_state, 'mu') for s in (first_a, first_b))
    whole = np.sqrt(sum(np.sum(x ** 2) for x in leaves(mu_a)))
    assert whole > 0
    for (path, _), a, b in zip(jax.tree_util.tree_leaves_with_path(mu_a), leaves(mu_a),
                               leaves(mu_b)):
        err = np.linalg.norm(a - b)
        assert err <= 1e-4 * np.linalg.norm(a) + 1e-6 * whole, (
            f'gradient of {jax.tree_util.keystr(path)}: |{what}| = {err:.3g}, '
            f'|grad| = {np.linalg.norm(a):.3g}')


@pytest.mark.parametrize('case', list(CASES))
def test_eight_devices_match_one(devices, case, seed):
    spec, loss, strategy, mesh_name = CASES[case]
    one = make_setup(spec, loss, sharding.make_mesh({'data': 1}, devices[:1]))
    eight = make_setup(spec, loss, sharding.make_mesh(MESHES[mesh_name], devices))
    initial = jax.device_get(step.init_state(one, jax.random.key(1)))
    first1, s1, m1 = run(one, initial, seed, 'replicated')
    initial = jax.device_get(step.init_state(one, jax.random.key(1)))  # fresh: the key is donated
    first8, s8, m8 = run(eight, initial, seed, strategy)
    check_placement(s8, strategy)
    s1, s8 = jax.device_get(s1), jax.device_get(s8)
    assert int(s1.step) == int(s8.step) == STEPS

    # after one step from identical parameters: gradients, BatchNorm statistics, parameters
    first_gradients_match(first1, first8, '8 dev - 1 dev')
    for a, b in zip(leaves(first1.batch_stats), leaves(first8.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(first1.params),
                            leaves(first8.params)):
        err = np.max(np.abs(np.asarray(a) - b))
        assert err <= LR / 10, f'{jax.tree_util.keystr(path)} differs by {err:.3g}'

    # after three steps: the bulk of the parameters, and every step's metrics
    moved = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(leaves(initial.params),
                                                              leaves(s1.params))))
    assert moved > 1e-2, 'the parameters did not move: the comparison would be vacuous'
    bulk_within(s1.params, s8.params, LR / 10, 'parameters after three steps')
    if s1.ema_params is not None:
        bulk_within(s1.ema_params, s8.ema_params, LR / 10, 'EMA parameters')
    for i, (a, b) in enumerate(zip(m1, m8)):
        assert sorted(a) == sorted(b)
        assert a['subset_size'] == b['subset_size']
        for key in sorted(set(a) - {'grad_norm', 'subset_size'}):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-7,
                                       err_msg=f'{key} at step {i}')
        np.testing.assert_allclose(a['grad_norm'], b['grad_norm'], rtol=1e-5 if i == 0 else 1e-3,
                                   err_msg=f'grad_norm at step {i}')
    if loss.kind == 'psd':  # the soft targets were in play (bank, previous step: from step 2)
        assert m1[-1]['subset_size'] > 0 and m1[-1]['loss'] != pytest.approx(m1[-1]['clip'])


@pytest.mark.parametrize('fraction', [0.25, 0.0])
def test_second_pass_teacher_is_a_forward_over_the_subset(devices, fraction, seed):
    """The teacher pass embeds exactly the subset's items (padded to whole shards, padding
    dropped) on the teacher view, with the model's parameters, and nothing else."""
    loss = losses.LossConfig(teacher='second_pass', subset_fraction=fraction,
                             teacher_temperature=0.5)
    setup = make_setup('tiny', loss, sharding.make_mesh({'data': 8}, devices))
    state = step.init_state(setup, jax.random.key(2))
    batch = put(batches(setup, seed)[0], setup.mesh)
    idx = losses.subset_indices(jax.random.key(3), B, fraction)

    @jax.jit
    def run(state, batch, idx):
        teacher = step._forward_teacher(setup, state, batch, idx, B)
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


def test_bank_teacher_distils_from_each_pairs_last_visit(devices, seed):
    """psd.teacher='bank': a pair's first visit keeps one-hot targets and writes its embeddings
    into the bank; a later visit distils from those (the teacher's columns are the pairs the
    bank has seen), with the student's current scale. Checked against psd_loss given the same
    teacher explicitly, on 8 devices."""
    n_pairs = 40
    loss = losses.LossConfig(teacher='bank', subset_fraction=0.5, teacher_temperature=1.0,
                             soft_weight='constant')
    mesh = sharding.make_mesh({'data': 8}, devices)
    setup = dataclasses.replace(make_setup('tiny', loss, mesh), bank_size=n_pairs)
    with pytest.raises(ValueError, match='bank_size'):
        dataclasses.replace(setup, bank_size=0)
    shardings = step.state_shardings(setup)
    state = step.init_state(setup, jax.random.key(4))
    first, second = batches(setup, seed)[:2]
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
                                  subset=subset & seen, alpha=0.5, teacher=teacher,
                                  config=dataclasses.replace(setup.loss,
                                                             teacher_temperature=1.0))
    state, m2 = fn(state, put(second, mesh))
    m2 = jax.device_get(m2)
    assert m2['subset_size'] == np.sum(subset & seen) > 0
    np.testing.assert_allclose(m2['loss'], want, rtol=1e-5)
    np.testing.assert_allclose(m2['distill'], parts['distill'], rtol=1e-5)
    # the teacher changed the loss: near initialisation the one-hot and the teacher's targets
    # both have cross-entropies near ln B, so the change is small (7e-5 relative seen), but far
    # above float32 rounding (1e-7)
    assert abs(float(m2['loss']) - float(m2['clip'])) > 2e-6 * abs(float(m2['clip']))
    np.testing.assert_array_equal(jax.device_get(state.bank['seen']),
                                  np.arange(n_pairs) < B + B // 2)


def test_previous_step_teacher_distils_among_the_repeated_pairs(devices, seed):
    """psd.teacher='previous_step' (DLB): the first k = B/4 pairs of a batch repeat slots
    [k, 2k) of the previous batch, and the previous step's embeddings (and scale) of them are
    the teacher among them. Step 1 has nothing kept (plain CLIP); step 2 equals psd_loss
    given that teacher explicitly (embeddings from an independent forward with step 1's
    parameters); step 3's repeated slots do not match the kept indices, so it is plain CLIP."""
    k = B // 4
    loss = losses.LossConfig(teacher='previous_step', subset_fraction=0.25,
                             teacher_temperature=1.0, soft_weight='constant')
    mesh = sharding.make_mesh({'data': 8}, devices)
    setup = make_setup('tiny', loss, mesh)
    assert setup.repeated_pairs == k
    shardings = step.state_shardings(setup)
    state = step.init_state(setup, jax.random.key(5))
    first, second, third = batches(setup, seed)
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
                                  subset=mask, alpha=0.5, teacher=teacher,
                                  config=dataclasses.replace(setup.loss,
                                                             teacher_temperature=1.0))
    state, m2 = fn(state, put(second, mesh))
    m2 = jax.device_get(m2)
    assert m2['subset_size'] == k
    np.testing.assert_allclose(m2['loss'], want, rtol=1e-5)
    np.testing.assert_allclose(m2['distill'], parts['distill'], rtol=1e-5)
    # the teacher changed the loss: near initialisation the one-hot and the teacher's targets
    # both have cross-entropies near ln B, so the change is small (7e-5 relative seen), but far
    # above float32 rounding (1e-7)
    assert abs(float(m2['loss']) - float(m2['clip'])) > 2e-6 * abs(float(m2['clip']))

    state, m3 = fn(state, put(third, mesh))
    m3 = jax.device_get(m3)
    assert m3['subset_size'] == 0
    np.testing.assert_allclose(m3['loss'], m3['clip'], rtol=1e-6)

    with pytest.raises(ValueError, match='fraction <= 0.5'):
        losses.LossConfig(teacher='previous_step', subset_fraction=0.75)
    with pytest.raises(ValueError, match='repeats 4'):
        step.compile_train_step(dataclasses.replace(setup, repeated_pairs=3), shardings, first)
    with pytest.raises(ValueError, match=r"missing \['index'\]"):
        step.compile_train_step(setup, shardings, {k: first[k] for k in ('image', 'text')})
