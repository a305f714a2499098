"""model.remat and model.scan_layers change memory and compile time, not values: the same
loss and parameter gradients as the plain towers (a ViT and the text transformer, fresh
inputs; a ResNet's rematerialised blocks in training mode, BatchNorm statistics included);
the scanned layout converts both ways (psd_jax/persistence/layout.py); a wrong policy is named.

Tolerance: the plain and lever models are compiled separately, so XLA may fuse and order the
float32 arithmetic differently: gradients within 1e-5 of the largest gradient element, loss
within 1e-6 relative. Measured on CPU: bit-identical (3 seeds x 5 cases)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psd_jax import config as config_lib
from psd_jax import sharding
from psd_jax.persistence import layout
from psd_jax.models import build_model, preset

SPEC = preset('tiny', image=dict(kind='vit', patch_size=8, width=32, depth=3, heads=2))


def loss_and_grads(model, params, images, tokens, weights):
    def loss(p):
        out = model.apply({'params': p}, images, tokens)
        return jnp.sum(weights * (out['image'] @ out['text'].T))
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture
def plain(seed):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(6, 32, 32, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, SPEC.vocab_size, size=(6, SPEC.context_length)))
    weights = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)
    model = build_model(SPEC)
    params = nn.meta.unbox(model.init(jax.random.key(seed), images, tokens)['params'])
    return params, (images, tokens, weights), loss_and_grads(model, params, images, tokens,
                                                             weights)


@pytest.mark.parametrize('remat,scan', [(r, s) for r in ('none', 'minimal', 'full')
                                         for s in (False, True) if (r, s) != ('none', False)])
def test_levers_give_the_plain_loss_and_gradients(plain, remat, scan):
    params, inputs, (loss0, grads0) = plain
    model = build_model(SPEC, remat=remat, scan_layers=scan)
    converted = layout.convert(params, scan)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs[:2]))['params']
    assert jax.tree.structure(shapes) == jax.tree.structure(converted)
    loss, grads = loss_and_grads(model, converted, *inputs)
    grads = layout.convert(grads, False)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads0))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads0), jax.tree.leaves(grads)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


RESNET = preset('tiny', image=dict(kind='resnet', layers=(1, 2), width=8, heads=2))


@pytest.mark.parametrize('remat', ['minimal', 'full'])
def test_resnet_remat_gives_the_plain_loss_gradients_and_statistics(seed, remat):
    """In training mode (BatchNorm over the batch, running statistics updated): the same loss,
    parameter gradients and new statistics with the blocks rematerialised."""
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(6, 32, 32, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, RESNET.vocab_size, size=(6, RESNET.context_length)))
    weights = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)

    def run(model, variables):
        def loss(p):
            out, new = model.apply({**variables, 'params': p}, images, tokens, train=True,
                                   mutable=['batch_stats'])
            return jnp.sum(weights * (out['image'] @ out['text'].T)), new['batch_stats']
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

    plain_model = build_model(RESNET)
    variables = nn.meta.unbox(plain_model.init(jax.random.key(seed), images, tokens))
    (loss0, stats0), grads0 = run(plain_model, variables)
    (loss, stats), grads = run(build_model(RESNET, remat=remat), variables)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads0))
    assert jax.tree.structure(grads) == jax.tree.structure(grads0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads0), jax.tree.leaves(grads)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(stats)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(stats0), jax.tree.leaves(variables['batch_stats']))]
    assert max(moved) > 1e-3  # the statistics were updated, so their equality says something


def test_scanned_layout_round_trips(plain):
    params = plain[0]
    scanned = layout.convert(params, True)
    blocks = scanned['text_tower']['transformer']['blocks']
    assert blocks['mlp']['fc']['kernel'].shape == (2, 32, 128)  # (depth, width, hidden)
    assert 'block0' not in scanned['image_tower']['transformer']
    back = layout.convert(scanned, False)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
    again = layout.convert(scanned, True)  # already scanned: unchanged, leaf for leaf
    assert jax.tree.structure(again) == jax.tree.structure(scanned)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def refused(key, value, pattern):
    """validate() refuses base_config() with config.<key> = value, matching `pattern`."""
    config = config_lib.base_config()
    section, field = key.split('.')
    config[section][field] = value
    with pytest.raises(ValueError, match=pattern):
        config_lib.validate(config)
    return config


def test_unknown_levers_are_named(devices):
    refused('model.remat', 'some', r"model.remat.*'some'.*\['none', 'minimal', 'full'\]")
    with pytest.raises(ValueError, match='model.remat'):
        build_model('tiny', remat='everything')
    refused('train.micro_batches', 0, 'train.micro_batches')
    config = refused('model.attention', 'flash',
                     r"model.attention.*'flash'.*\['xla', 'cudnn'\]")
    with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype='bfloat16'"):
        build_model('tiny', attention='cudnn')
    config.model.attention, config.model.dtype = 'cudnn', 'bfloat16'
    mesh = sharding.make_mesh({'data': 1}, devices[:1])
    with pytest.raises(ValueError, match="model.attention.*runs on NVIDIA GPUs; these devices "
                                         'are cpu'):
        config_lib.step_setup(config, mesh)


def test_scanned_blocks_keep_the_batch_split(devices):
    """Inside a scanned stack XLA may replicate the batch over the devices unless the blocks
    constrain it (sharding.activation_rules): with fsdp over 8 devices the scanned step's
    temporaries were 7x the plain step's before the constraint, 1.5x with it; 3x fails."""
    from psd_jax import compile_check
    config = config_lib.base_config()
    config.mesh.data, config.mesh.fsdp, config.param_sharding = 1, -1, 'fsdp'
    config.model.image_size, config.model.context_length = 32, 16
    temp = {}
    for scan in (False, True):
        config.model.scan_layers = scan
        temp[scan] = compile_check.compile_for(config, devices, 512, 0)['temp_gib']
    assert temp[True] <= 3 * temp[False], temp


def residual_bytes(model, batch: int, size: int) -> int:
    """Bytes the forward pass keeps for the backward (the leaves of jax.vjp's closure, by
    shape only: nothing is run) of a loss over `model`'s two towers."""
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, SPEC.context_length), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens))[
        'params']

    def residuals(p, x, t):
        def loss(p):
            out = model.apply({'params': p}, x, t)
            return jnp.sum(out['image'] @ out['text'].T)
        return jax.tree.leaves(jax.vjp(loss, p)[1])
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize
               for s in jax.eval_shape(residuals, params, images, tokens))


def test_rematerialisation_keeps_less_for_the_backward():
    """The lever does what it is for: the activations the forward keeps for the backward pass
    fall with 'minimal' (matmul outputs only) and fall most with 'full' (block inputs only),
    with and without scanned layers; a policy that changed nothing fails this. (What is
    measured is what remat controls: XLA's CPU backend does not turn it into smaller compiled
    temporaries, measured equal for the three policies here, while on TPU it does:
    docs/performance.md's fit tables.)"""
    spec = preset('tiny', image=dict(kind='vit', patch_size=4, width=64, depth=4, heads=2))
    for scan in (False, True):
        none, minimal, full = (residual_bytes(build_model(spec, remat=r, scan_layers=scan), 16,
                                              32) for r in ('none', 'minimal', 'full'))
        assert full < minimal < 0.5 * none, (scan, none, minimal, full)
        assert full < 0.2 * none, (scan, none, full)
