"""Schedules against closed forms in float64; mesh construction and parameter placement."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from psd_jax import sharding
from psd_jax.training import schedules, step
from psd_jax.models import build_model


def test_warmup_cosine_against_closed_form():
    base, total, warm, end = 3e-4, 1000, 100, 0.1
    fn = jax.jit(schedules.warmup_cosine(base, total, warm, end))
    for t in [0, 1, 50, 99, 100, 101, 400, 750, 999, 1000, 1200]:
        if t < warm:
            ref = base * (t + 1) / warm
        else:
            frac = min((t - warm) / (total - warm), 1.0)
            ref = base * end + (base - base * end) * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(fn(t)) == pytest.approx(ref, rel=1e-6), t


@pytest.mark.parametrize('kind', schedules.ALPHA_SCHEDULES)
def test_alpha_schedules_against_closed_form(kind):
    a_max, total, start = 0.8, 500, 100
    fn = jax.jit(schedules.alpha_schedule(kind, a_max, total, start_step=start))
    for t in [0, 100, 150, 300, 499, 500, 800]:
        frac = min(max((t - start) / (total - start), 0.0), 1.0)
        ref = {'constant': a_max, 'linear': a_max * frac,
               'cosine': a_max * 0.5 * (1 - math.cos(math.pi * frac))}[kind]
        assert float(fn(t)) == pytest.approx(ref, rel=1e-6, abs=1e-7), (kind, t)


def test_bad_schedules_are_named():
    with pytest.raises(ValueError, match="alpha_schedule='step'.*linear"):
        schedules.alpha_schedule('step', 0.5, 10)
    with pytest.raises(ValueError, match='alpha_max=1.5'):
        schedules.alpha_schedule('linear', 1.5, 10)
    with pytest.raises(ValueError, match='warmup_steps=20'):
        schedules.warmup_cosine(1e-3, 10, 20)


def test_make_mesh_resolves_the_rest(devices):
    mesh = sharding.make_mesh({'data': -1, 'fsdp': 2, 'model': 1}, devices)
    assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'model': 1}
    assert sharding.data_axes(mesh) == ('data', 'fsdp') and sharding.data_size(mesh) == 8
    one = sharding.make_mesh({'data': -1}, devices[:1])
    assert one.size == 1
    with pytest.raises(ValueError, match='need 6 devices, there are 8'):
        sharding.make_mesh({'data': 3, 'fsdp': 2}, devices)
    with pytest.raises(ValueError, match="mesh axes \\['tensor'\\]"):
        sharding.make_mesh({'tensor': 8}, devices)
    with pytest.raises(ValueError, match='at most one size may be -1'):
        sharding.make_mesh({'data': -1, 'fsdp': -1}, devices)
    with pytest.raises(ValueError, match='global batch size 12 does not divide'):
        sharding.check_batch(12, mesh, 'global batch')


def test_fsdp_rules_shard_what_divides_and_replicate_the_rest(devices):
    mesh = sharding.make_mesh({'data': 2, 'fsdp': 4}, devices)
    model = build_model('tiny')
    boxed = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                           np.zeros((1, 16), np.int32))
    sh = sharding.param_shardings(boxed, mesh, 'fsdp')['params']
    # token embedding (vocab 1000, embed 32): vocab divides by 4 and comes first
    assert sh['text_tower']['token_embedding']['embedding'].spec == jax.P('fsdp', None)
    assert sh['text_tower']['text_projection'].spec == jax.P('fsdp', None)
    assert sh['logit_scale'].spec == jax.P()
    rep = sharding.param_shardings(boxed, mesh, 'replicated')['params']
    assert all(s.spec == jax.P() or all(a is None for a in s.spec) for s in jax.tree.leaves(rep))
    with pytest.raises(ValueError, match="strategy 'zero3'"):
        sharding.param_shardings(boxed, mesh, 'zero3')
    odd = sharding.make_mesh({'data': 1, 'fsdp': 8}, devices)
    tiny_heads = sharding.param_shardings(boxed, odd, 'fsdp_tp')['params']
    # embed = 32 divides by 8, so it is sharded; nothing is sharded twice over one axis
    for s in jax.tree.leaves(tiny_heads):
        named = [a for a in s.spec if a is not None]
        assert len(named) == len(set(named))


def test_weight_decay_mask_spares_gains_biases_and_scale():
    params = {'logit_scale': np.zeros(()), 'dense': {'kernel': np.zeros((4, 4)),
              'bias': np.zeros((3, 2, 2))}, 'ln': {'scale': np.zeros(4), 'bias': np.zeros(4)},
              'class_embedding': np.zeros(4), 'positional_embedding': np.zeros((5, 4))}
    mask = step.weight_decay_mask(params)
    assert mask == {'logit_scale': False, 'dense': {'kernel': True, 'bias': False},
                    'ln': {'scale': False, 'bias': False}, 'class_embedding': False,
                    'positional_embedding': True}
