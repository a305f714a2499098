"""Loss parity: the sharded CLIP / PSD / sigmoid losses against the float64 NumPy reference.

Values and gradients (image, text embeddings and logit scale) on meshes of 1, 2, 4 and 8
devices plus 2-D meshes, with fresh random inputs each run (the seed is in every failure
message). Tolerance: float32 results within 1e-5 of the reference, relative to the largest
reference magnitude of that quantity (max |got - ref| <= 1e-5 * max |ref|); for the scalar
gradients (logit scale, bias), which are sums of B*B terms of both signs, relative to the sum of
the terms' absolute values.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from psd_jax import losses, sharding
from reference import psd_reference, sigmoid_reference

B, D = 32, 16
RTOL = 1e-5

MESHES = {'1': {'data': 1}, '2': {'data': 2}, '4': {'data': 4}, '8': {'data': 8},
          '2x4': {'data': 2, 'fsdp': 4}, '4x2m': {'data': 4, 'model': 2}}


@pytest.fixture(scope='module')
def meshes(devices):
    out = {}
    for name, axes in MESHES.items():
        n = int(np.prod(list(axes.values())))
        out[name] = sharding.make_mesh(axes, devices[:n])
    return out


def fresh_inputs():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)

    def unit(*shape):
        x = rng.standard_normal(shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    u, v = unit(B, D), unit(B, D)
    v = (0.6 * u + v)  # correlated pairs, so the losses are not all log(B)
    v = (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)
    logit_scale = np.float32(np.log(rng.uniform(5, 30)))
    return seed, rng, u, v, logit_scale, unit


def close(got, ref, what, seed, magnitude=None):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = np.max(np.abs(got - ref))
    magnitude = np.max(np.abs(ref)) if magnitude is None else magnitude
    bound = RTOL * max(magnitude, 1e-12)
    assert err <= bound, f'{what}: max |err| {err:.3g} > {bound:.3g} (seed {seed})'


@functools.lru_cache(maxsize=None)
def compiled_psd(mesh, mode: str, teacher_temperature: float, diagonal: str):
    """jit(value_and_grad) of psd_loss for one structure; alpha and subset are runtime inputs."""

    def f(u, v, scale, subset, alpha, tu, tv, tscale):
        teacher = None
        if mode != 'same_pass':
            teacher = losses.Teacher(tu, tv, tscale, subset)
        if mode == 'clip':
            return losses.clip_loss(u, v, scale, mesh=mesh)
        return losses.psd_loss(u, v, scale, mesh=mesh, subset=subset, alpha=alpha,
                               teacher=teacher, teacher_temperature=teacher_temperature,
                               teacher_diagonal=diagonal)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 5, 6, 7), has_aux=True))


PSD_CASES = [  # (teacher source, teacher temperature, diagonal)
    ('clip', 1.0, 'keep'),
    ('same_pass', 2.0, 'keep'),
    ('same_pass', 1.0, 'remove'),
    ('second_pass', 1.5, 'keep'),
    ('ema', 0.7, 'remove'),
]


@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('mode,temperature,diagonal', PSD_CASES)
def test_psd_matches_float64_reference(meshes, mesh_name, mode, temperature, diagonal):
    mesh = meshes[mesh_name]
    fn = compiled_psd(mesh, mode, temperature, diagonal)
    for alpha, fraction in ((0.3, 0.5), (1.0, 1.0), (0.8, 0.125)):
        seed, rng, u, v, scale, unit = fresh_inputs()
        idx = np.sort(rng.permutation(B)[:losses.subset_size(B, fraction)])
        subset = np.zeros(B, bool)
        subset[idx] = True
        if mode == 'second_pass':  # same parameters: same logit scale, another view
            tu, tv, tscale = unit(B, D), unit(B, D), scale
        else:  # EMA parameters: their own logit scale
            tu, tv, tscale = unit(B, D), unit(B, D), np.float32(np.log(rng.uniform(5, 30)))
        (loss, parts), grads = fn(u, v, scale, subset, np.float32(alpha), tu, tv, tscale)
        ref_teacher = None if mode in ('clip', 'same_pass') else (tu, tv, tscale, subset)
        ref_loss, ref_parts, ref_grads, magnitudes = psd_reference(
            u, v, scale, None if mode == 'clip' else subset, alpha, ref_teacher,
            temperature, diagonal == 'remove')
        tag = f'{mode} T={temperature} {diagonal} mesh={mesh_name} a={alpha} f={fraction}'
        close(loss, ref_loss, f'loss {tag}', seed)
        for key in ('clip', 'distill') if mode != 'clip' else ('clip',):
            close(parts[key], ref_parts[key], f'part {key} {tag}', seed)
        if mode != 'clip':
            assert float(parts['subset_size']) == ref_parts['subset_size']
            assert float(parts['alpha']) == pytest.approx(alpha)
        names = ('d/image', 'd/text', 'd/logit_scale')
        for name, g, r, m in zip(names, grads[:3], ref_grads, magnitudes):
            close(g, r, f'{name} {tag}', seed, magnitude=m)
        for g in grads[3:]:  # the teacher is under stop_gradient
            assert not np.any(np.asarray(g)), f'gradient reached the teacher ({tag})'


@functools.lru_cache(maxsize=None)
def compiled_sigmoid(mesh):
    f = lambda u, v, s, b: losses.sigmoid_loss(u, v, s, b, mesh=mesh)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_sigmoid_matches_float64_reference(meshes, mesh_name):
    seed, rng, u, v, scale, _ = fresh_inputs()
    bias = np.float32(rng.uniform(-10, 0))
    loss, grads = compiled_sigmoid(meshes[mesh_name])(u, v, scale, bias)
    ref_loss, ref_grads, magnitudes = sigmoid_reference(u, v, scale, bias)
    close(loss, ref_loss, f'sigmoid loss mesh={mesh_name}', seed)
    names = ('d/image', 'd/text', 'd/logit_scale', 'd/bias')
    for name, g, r, m in zip(names, grads, ref_grads, magnitudes):
        # scalar gradients: relative to the sum of |terms| (they are sums with cancellation)
        close(g, r, f'sigmoid {name} mesh={mesh_name}', seed, magnitude=m)


def test_logit_scale_is_clipped_at_100(meshes):
    seed, _, u, v, _, _ = fresh_inputs()
    above = np.float32(np.log(100.0) + 0.5)
    (loss, _), grads = compiled_psd(meshes['8'], 'clip', 1.0, 'keep')(
        u, v, above, np.zeros(B, bool), np.float32(0), u, v, above)
    ref_loss, _, _, _ = psd_reference(u, v, np.log(100.0))
    close(loss, ref_loss, 'loss at scale 100', seed)
    assert float(grads[2]) == 0.0
