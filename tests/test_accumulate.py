"""GradCache accumulation (train.micro_batches): k = 4 micro-batches give the one-big-batch
gradient and the same three train steps, with every negative of the global batch, on a
data 2 x fsdp 2 mesh (4 rows per shard, one per micro-batch); what cannot be split (a k
that does not divide the shard, BatchNorm) is named.

Tolerances as tests/test_step.py's (the same rounding-level differences: the same arithmetic
in another order): first-step gradient per leaf within 1e-4 of its norm plus 1e-6 of the
whole, the bulk of the parameters after three steps within lr / 10, metrics to 1e-4."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from psd_jax import losses, sharding
from psd_jax.training import step
from test_step import B, LR, TINY_RESNET, bulk_within, first_gradients_match, make_setup, run

CASES = {
    'psd_ema': losses.LossConfig(teacher='ema', subset_fraction=0.5),
    'psd_second_pass_ring': losses.LossConfig(teacher='second_pass', teacher_temperature=0.5,
                                              impl='ring', tile=2),
    'sigmoid': losses.LossConfig(kind='sigmoid'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_four_micro_batches_equal_one_batch(devices, case, seed):
    mesh = sharding.make_mesh({'data': 2, 'fsdp': 2}, devices[:4])  # 4 rows per shard
    whole = make_setup('tiny', CASES[case], mesh)
    micro = dataclasses.replace(whole, micro_batches=4)
    initial = jax.device_get(step.init_state(whole, jax.random.key(7)))
    first1, s1, m1 = run(whole, initial, seed, 'fsdp')
    initial = jax.device_get(step.init_state(whole, jax.random.key(7)))
    first4, s4, m4 = run(micro, initial, seed, 'fsdp')
    first_gradients_match(first1, first4, 'k=4 - k=1')
    s1, s4 = jax.device_get(s1), jax.device_get(s4)
    bulk_within(s1.params, s4.params, LR / 10, 'parameters after three steps')
    for i, (a, b) in enumerate(zip(m1, m4)):
        for key in sorted(set(a) - {'grad_norm'}):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-7,
                                       err_msg=f'{key} at step {i}')


def test_what_cannot_be_split_is_named(devices, seed):
    mesh = sharding.make_mesh({'data': 8}, devices)
    setup = dataclasses.replace(make_setup('tiny', losses.LossConfig(kind='clip'), mesh),
                                micro_batches=3)
    shardings = step.state_shardings(setup)
    with pytest.raises(ValueError, match=r'train.micro_batches=3 must divide the per-shard '
                                         r'batch 2'):
        step.compile_train_step(setup, shardings, step.batch_spec(setup, B))
    resnet = dataclasses.replace(make_setup(TINY_RESNET, losses.LossConfig(kind='clip'), mesh),
                                 micro_batches=2)
    with pytest.raises(ValueError, match='BatchNorm'):
        step.compile_train_step(resnet, step.state_shardings(resnet),
                                step.batch_spec(resnet, B))


def test_micro_batches_lower_the_compiled_temporaries(devices):
    """Accumulation is a memory lever: the compiled train step with k = 4 micro-batches asks
    for clearly fewer bytes of temporaries than the one-batch step at the same global batch (a
    k that split nothing would fail this)."""
    mesh = sharding.make_mesh({'data': 2}, devices[:2])
    whole = make_setup('tiny', losses.LossConfig(kind='clip'), mesh)
    sizes = {}
    for k in (1, 4):
        setup = dataclasses.replace(whole, micro_batches=k)
        compiled = step.compile_train_step(setup, step.state_shardings(setup),
                                           step.batch_spec(setup, 64))
        sizes[k] = compiled.memory_analysis().temp_size_in_bytes
    assert sizes[4] < 0.7 * sizes[1], sizes
