"""The ring loss (loss.impl='ring'): values and gradients equal the float64 reference and the
all_gather loss for CLIP, PSD with every kind of teacher input and sigmoid, on 2, 4 and 8
devices (and a 2-D data mesh) with several tile widths; its compiled program holds no buffer
of b x B elements or more (the all_gather loss, the control, does); bad tiles and
implementations are named. Tolerance as tests/test_losses.py: 1e-5 of the reference's
largest magnitude (measured: about 1e-7 in value, 2e-6 for the scale's gradient)."""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest

from psd_jax import losses, sharding
from reference import psd_reference, sigmoid_reference
from test_losses import B, D, close, fresh_inputs

MESHES = {'2': {'data': 2}, '4': {'data': 4}, '8': {'data': 8}, '2x4': {'data': 2, 'fsdp': 4}}
# (teacher input, temperature, diagonal, soft weight): the same pass; a forward teacher (second
# pass, EMA) over the subset; a bank / previous-step teacher, whose columns are the pairs it
# holds; each subset row's teacher share a, or a times the teacher's mass off the pair
CASES = [('clip', 1.0, 'keep', 'constant'), ('same_pass', 2.0, 'keep', 'constant'),
         ('same_pass', 1.0, 'remove', 'constant'), ('forward', 0.7, 'remove', 'constant'),
         ('bank', 1.0, 'keep', 'constant'), ('same_pass', 2.0, 'keep', 'off_diagonal'),
         ('bank', 0.7, 'keep', 'off_diagonal')]


@functools.lru_cache(maxsize=None)
def compiled(mesh, mode, temperature, diagonal, impl, tile, soft_weight='constant'):
    def f(u, v, scale, subset, columns, tu, tv, tscale):
        if mode == 'clip':
            return losses.clip_loss(u, v, scale, mesh=mesh,
                                    config=losses.LossConfig(impl=impl, tile=tile))
        teacher = None if mode == 'same_pass' else losses.Teacher(tu, tv, tscale, columns)
        config = losses.LossConfig(teacher_temperature=temperature, teacher_diagonal=diagonal,
                                   soft_weight=soft_weight, impl=impl, tile=tile)
        return losses.psd_loss(u, v, scale, mesh=mesh, config=config, subset=subset, alpha=0.6,
                               teacher=teacher)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('mode,temperature,diagonal,soft_weight', CASES)
def test_ring_matches_reference_and_all_gather(devices, mesh_name, mode, temperature,
                                               diagonal, soft_weight):
    axes = MESHES[mesh_name]
    n = int(np.prod(list(axes.values())))
    mesh = sharding.make_mesh(axes, devices[:n])
    seed, rng, u, v, scale, unit = fresh_inputs()
    subset = rng.random(B) < 0.5
    columns = subset if mode == 'forward' else rng.random(B) < 0.7
    if mode == 'bank':
        subset = subset & columns  # rows distil only from pairs the bank holds
    tu, tv, tscale = unit(B, D), unit(B, D), np.float32(np.log(rng.uniform(5, 30)))
    ref_teacher = (tu, tv, tscale, columns) if mode in ('forward', 'bank') else None
    ref_loss, ref_parts, ref_grads, magnitudes = psd_reference(
        u, v, scale, None if mode == 'clip' else subset, 0.6 if mode != 'clip' else 0.0,
        ref_teacher, temperature, diagonal == 'remove', soft_weight)
    gathered = compiled(mesh, mode, temperature, diagonal, 'all_gather', 0, soft_weight)(
        u, v, scale, subset, columns, tu, tv, tscale)
    for tile in (B // n, max(1, B // n // 4)):
        (loss, parts), grads = compiled(mesh, mode, temperature, diagonal, 'ring', tile,
                                        soft_weight)(u, v, scale, subset, columns, tu, tv,
                                                     tscale)
        tag = f'{mode} T={temperature} {diagonal} {soft_weight} mesh={mesh_name} tile={tile}'
        close(loss, ref_loss, f'loss {tag}', seed)
        close(loss, gathered[0][0], f'loss vs all_gather {tag}', seed)
        for key in ('clip',) if mode == 'clip' else ('clip', 'distill', 'soft_weight'):
            close(parts[key], ref_parts[key], f'part {key} {tag}', seed)
        for name, g, g_all, r, m in zip(('d/image', 'd/text', 'd/logit_scale'), grads,
                                        gathered[1], ref_grads, magnitudes):
            close(g, r, f'{name} {tag}', seed, magnitude=m)
            close(g, g_all, f'{name} vs all_gather {tag}', seed, magnitude=m)


@pytest.mark.parametrize('mesh_name', ['2', '8'])
def test_ring_sigmoid_matches_reference(devices, mesh_name):
    axes = MESHES[mesh_name]
    n = int(np.prod(list(axes.values())))
    mesh = sharding.make_mesh(axes, devices[:n])
    seed, rng, u, v, scale, _ = fresh_inputs()
    bias = np.float32(rng.uniform(-10, 0))
    ref_loss, ref_grads, magnitudes = sigmoid_reference(u, v, scale, bias)
    for tile in (B // n, 1):
        config = losses.LossConfig(kind='sigmoid', impl='ring', tile=tile)
        f = lambda *a: losses.sigmoid_loss(*a, mesh=mesh, config=config)[0]  # noqa
        loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(u, v, scale, bias)
        close(loss, ref_loss, f'sigmoid ring loss tile={tile}', seed)
        for name, g, r, m in zip(('d/image', 'd/text', 'd/scale', 'd/bias'), grads, ref_grads,
                                 magnitudes):
            close(g, r, f'sigmoid ring {name} mesh={mesh_name} tile={tile}', seed, magnitude=m)


def largest_buffer(hlo: str) -> int:
    """Elements of the largest array shape written in an HLO module's text."""
    sizes = [int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
             for dims in re.findall(r'(?:f32|bf16|f16|s32|pred|u32)\[([\d,]*)\]', hlo)]
    return max(sizes)


def test_ring_never_holds_a_b_by_B_buffer(devices):
    """B = 1024 on 8 devices (b = 128), tile 16, D = 8: the compiled ring (forward and
    backward) holds nothing of b x B = 131,072 elements; the all_gather loss does."""
    big_b, dim = 1024, 8
    mesh = sharding.make_mesh({'data': 8}, devices)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((big_b, dim)).astype(np.float32)
    subset = np.arange(big_b) % 2 == 0

    def program(impl, tile):
        config = losses.LossConfig(teacher_temperature=2.0, impl=impl, tile=tile)
        f = lambda x: losses.psd_loss(x, x, 2.0, mesh=mesh, config=config,  # noqa
                                      subset=subset, alpha=0.5)[0]
        return jax.jit(jax.grad(f)).lower(u).compile().as_text()

    slab = (big_b // 8) * big_b
    assert largest_buffer(program('all_gather', 0)) >= slab  # the control sees the slab
    ring_largest = largest_buffer(program('ring', 16))
    assert ring_largest < slab // 4, ring_largest


def test_bad_tile_and_impl_are_named(devices):
    mesh = sharding.make_mesh({'data': 4}, devices[:4])
    u = np.eye(B, D, dtype=np.float32)
    with pytest.raises(ValueError, match=r'loss.tile=3 must divide the per-device batch 8'):
        losses.clip_loss(u, u, 1.0, mesh=mesh,
                         config=losses.LossConfig(kind='clip', impl='ring', tile=3))
    with pytest.raises(ValueError, match=r"loss.impl='tree' is not known; allowed: "
                                         r"\['all_gather', 'ring'\]"):
        losses.LossConfig(kind='clip', impl='tree')
    with pytest.raises(ValueError, match='loss.impl'):
        losses.LossConfig(kind='clip', impl='rings')
