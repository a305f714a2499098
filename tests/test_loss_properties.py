"""The degenerate-teacher identity, the config's answer to it, the memory claim, bad input."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from benchmarks import loss_memory
from psd_jax import losses, sharding

B, D = 32, 16
CLIP = losses.LossConfig(kind='clip')


def same_pass_config(temperature: float) -> losses.LossConfig:
    """PSD with this step's own logits as the teacher (temperature 1 is the degenerate case
    these tests study), each subset row's teacher share the constant a."""
    return losses.LossConfig(teacher='same_pass', teacher_temperature=temperature,
                             soft_weight='constant', allow_degenerate=True)


@pytest.fixture(scope='module')
def mesh8(devices):
    return sharding.make_mesh({'data': 8}, devices)


def unit(rng, *shape):
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope='module')
def grad_fns(mesh8):
    def clip(u, v, s):
        return losses.clip_loss(u, v, s, mesh=mesh8, config=CLIP)[0]

    def same_pass(u, v, s, subset, alpha):
        return losses.psd_loss(u, v, s, mesh=mesh8, config=same_pass_config(1.0), subset=subset,
                               alpha=alpha)[0]

    return (jax.jit(jax.value_and_grad(clip, argnums=(0, 1, 2))),
            jax.jit(jax.value_and_grad(same_pass, argnums=(0, 1, 2))))


def test_same_pass_same_temperature_is_scaled_clip(grad_fns, rng):
    """Teacher = this pass at the student's temperature: gradient = (1 - a) * CLIP gradient."""
    clip, same_pass = grad_fns
    u, v, s = unit(rng, B, D), unit(rng, B, D), np.float32(np.log(rng.uniform(5, 50)))
    everyone = np.ones(B, bool)
    _, g_clip = clip(u, v, s)
    for alpha in (0.25, 0.8):
        _, g_psd = same_pass(u, v, s, everyone, np.float32(alpha))
        for a, b in zip(g_psd, g_clip):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.max(np.abs(a - (1 - alpha) * b)) <= 1e-5 * np.max(np.abs(b))


def test_alpha_zero_is_exactly_clip(grad_fns, rng):
    clip, same_pass = grad_fns
    u, v, s = unit(rng, B, D), unit(rng, B, D), np.float32(np.log(rng.uniform(5, 50)))
    subset = rng.random(B) < 0.5
    loss_c, g_c = clip(u, v, s)
    loss_p, g_p = same_pass(u, v, s, subset, np.float32(0.0))
    np.testing.assert_array_equal(loss_p, loss_c)
    for a, b in zip(g_p, g_c):
        np.testing.assert_array_equal(a, b)


def test_a_different_teacher_is_not_scaled_clip(mesh8, rng):
    """The control for the identity: a teacher at another temperature changes the direction."""
    u, v, s = unit(rng, B, D), unit(rng, B, D), np.float32(np.log(20.0))
    everyone = np.ones(B, bool)
    g = jax.jit(jax.grad(lambda u, T: losses.psd_loss(
        u, v, s, mesh=mesh8, config=same_pass_config(T), subset=everyone, alpha=0.5)[0],
        argnums=0), static_argnums=1)
    g_clip = np.asarray(jax.jit(jax.grad(
        lambda u: losses.clip_loss(u, v, s, mesh=mesh8, config=CLIP)[0]))(u))
    g_hot = np.asarray(g(u, 3.0))
    assert np.max(np.abs(g_hot - 0.5 * g_clip)) > 1e-3 * np.max(np.abs(g_clip))


def test_config_refuses_the_degenerate_teacher():
    with pytest.raises(ValueError, match='degenerate'):
        losses.LossConfig(kind='psd', teacher='same_pass', teacher_temperature=1.0)
    # each way out of the trap is accepted
    losses.LossConfig(kind='psd', teacher='same_pass', teacher_temperature=2.0)
    losses.LossConfig(kind='psd', teacher='same_pass', teacher_temperature=1.0,
                      teacher_diagonal='remove')
    losses.LossConfig(kind='psd', teacher='second_pass', teacher_temperature=1.0)
    losses.LossConfig(kind='psd', teacher='same_pass', teacher_temperature=1.0,
                      allow_degenerate=True)
    losses.LossConfig(kind='clip', teacher='same_pass', teacher_temperature=1.0)


def square_buffers(hlo: str, n: int) -> list[str]:
    """Array shapes in an HLO text with two or more dimensions equal to n."""
    found = []
    for m in re.finditer(r'[a-z]+\d*\[([\d,]+)\]', hlo):
        dims = [int(d) for d in m.group(1).split(',') if d]
        if sum(d == n for d in dims) >= 2:
            found.append(m.group(0))
    return found


def compiled_loss(mesh, batch, teacher):
    return loss_memory.compile_loss(mesh, batch, 64,
                                    'psd_second_pass' if teacher else 'psd_same_pass')


@pytest.mark.parametrize('teacher', [False, True], ids=['same_pass', 'second_pass'])
def test_no_device_holds_the_batch_by_batch_matrix(devices, teacher):
    """No B x B array in the compiled 8-device program, and at most 1/4 of the one-device
    temporaries (about 1/6 measured at this size: both keep a handful of slab-sized temporaries,
    b x B floats each on 8 devices, B x B on one, plus the gathered B x D embeddings).
    """
    batch = 512
    sharded = compiled_loss(sharding.make_mesh({'data': 8}, devices), batch, teacher)
    assert square_buffers(sharded.as_text(), batch) == []
    temp = sharded.memory_analysis().temp_size_in_bytes
    # the control: the same inspection does see the B x B matrix of a one-device loss
    single = compiled_loss(sharding.make_mesh({'data': 1}, devices[:1]), batch, teacher)
    assert square_buffers(single.as_text(), batch)
    single_temp = single.memory_analysis().temp_size_in_bytes
    assert single_temp >= batch * batch * 4
    assert temp <= single_temp / 4, f'{temp} bytes per device vs {single_temp} on one device'
    assert temp <= 16 * (batch // 8) * batch * 4, 'more than 16 slabs of b x B floats'


def test_bad_input_is_named(mesh8, rng):
    u = unit(rng, B, D)
    s = np.float32(3.0)
    with pytest.raises(ValueError, match='does not divide across the data axes'):
        losses.clip_loss(u[:12], u[:12], s, mesh=mesh8, config=CLIP)
    with pytest.raises(ValueError, match='image batch 32 and text batch 24 differ'):
        losses.clip_loss(u, u[:24], s, mesh=mesh8, config=CLIP)
    with pytest.raises(ValueError, match=r'subset_fraction=1.5 must be in \[0, 1\]'):
        losses.subset_indices(jax.random.key(0), B, 1.5)
    with pytest.raises(ValueError, match=r'subset_fraction=-0.1'):
        losses.LossConfig(subset_fraction=-0.1)
    with pytest.raises(ValueError, match="psd.teacher='momentum'.*same_pass.*second_pass.*ema"):
        losses.LossConfig(teacher='momentum')
    with pytest.raises(ValueError, match="loss.kind='infonce'"):
        losses.LossConfig(kind='infonce')
    with pytest.raises(ValueError, match=r"psd keys \['temperature'\]"):
        losses.LossConfig.from_mapping('psd', {'temperature': 2.0})
    with pytest.raises(ValueError, match="psd.teacher_diagonal='drop' is not known"):
        losses.LossConfig(teacher_diagonal='drop')
    with pytest.raises(ValueError, match=r"loss keys \['tiles'\] are not known"):
        losses.LossConfig.from_mapping('psd', {}, tiles=4)
