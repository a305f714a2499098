"""Model presets: published CLIP parameter counts, logical axis names, dtypes, causal text."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psd_jax.models import PRESETS, build_model, preset

# Trainable parameters of OpenAI CLIP (224 px, context 77, vocabulary 49,408), BatchNorm
# running statistics excluded.
PUBLISHED = {'ViT-B/32': 151_277_313, 'ViT-B/16': 149_620_737, 'RN50': 102_007_137,
             'ViT-L/14': 427_616_513}


def abstract_variables(name_or_spec):
    spec = preset(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    model = build_model(spec)
    images = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, spec.context_length), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), images, tokens)


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_parameter_counts_equal_published_clip(name):
    params = nn.meta.unbox(abstract_variables(name)['params'])
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert count == PUBLISHED[name]


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_every_parameter_has_logical_axis_names(name):
    boxed = abstract_variables(name)['params']
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f'a parameter has no logical axis names: {leaf}'
        assert len(leaf.names) == leaf.value.ndim
        assert leaf.value.dtype == jnp.float32


@pytest.fixture(scope='module')
def tiny():
    model = build_model('tiny')
    spec = PRESETS['tiny']
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, spec.image_size, spec.image_size, 3)).astype(np.float32)
    tokens = rng.integers(1, spec.vocab_size - 1, (4, spec.context_length)).astype(np.int32)
    params = jax.jit(model.init)(jax.random.key(0), images, tokens)
    return model, params, images, tokens


def test_outputs_are_unit_norm_with_clip_scale(tiny):
    model, params, images, tokens = tiny
    out = jax.jit(model.apply)(params, images, tokens)
    assert out['image'].shape == out['text'].shape == (4, PRESETS['tiny'].embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out['image'], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out['text'], axis=1), 1.0, rtol=1e-5)
    assert float(out['logit_scale']) == pytest.approx(math.log(1 / 0.07))


def test_text_feature_is_causal_and_read_at_end_of_text(tiny, rng):
    """Tokens after the end-of-text token (the largest id) must not change the embedding."""
    model, params, _, tokens = tiny
    tokens = np.array(tokens)
    eot = PRESETS['tiny'].vocab_size - 1
    tokens[:, 5] = eot
    tokens[:, 6:] = 0
    changed = tokens.copy()
    changed[:, 6:] = rng.integers(1, eot - 1, changed[:, 6:].shape)
    encode = jax.jit(lambda p, t: model.apply(p, t, method=model.encode_text))
    a, b = encode(params, tokens), encode(params, changed)
    np.testing.assert_allclose(a, b, atol=1e-6)
    before = tokens.copy()
    before[:, 2] = (before[:, 2] + 1) % (eot - 1) + 1  # a token before end-of-text matters
    c = encode(params, before)
    assert np.max(np.abs(a - c)) > 1e-4


def test_bfloat16_compute_keeps_float32_parameters(tiny):
    _, params, images, tokens = tiny
    model16 = build_model('tiny', dtype='bfloat16')
    out16 = jax.jit(model16.apply)(params, images, tokens)
    out32 = jax.jit(build_model('tiny').apply)(params, images, tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert out16['image'].dtype == jnp.float32  # the loss always sees float32 embeddings
    cos = np.sum(np.asarray(out16['image']) * np.asarray(out32['image']), axis=1)
    assert np.all(cos > 0.99), cos


def test_resnet_tower_runs_and_keeps_batch_stats(rng):
    spec = preset('tiny', image=dict(kind='resnet', layers=(1, 1, 1, 1), width=8, heads=2))
    model = build_model(spec)
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    tokens = np.ones((2, spec.context_length), np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    assert 'batch_stats' in variables
    out, mutated = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
        variables, images, tokens)
    assert out['image'].shape == (2, spec.embed_dim)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                           variables['batch_stats'], mutated['batch_stats']))
    assert any(changed)


def test_bad_model_input_is_named():
    with pytest.raises(ValueError, match="preset 'ViT-Z/99'.*allowed"):
        preset('ViT-Z/99')
    with pytest.raises(ValueError, match='dtype'):
        build_model('tiny', dtype='float16')
    model = build_model('tiny')
    with pytest.raises(ValueError, match='spatial shape'):
        model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)), jnp.zeros((1, 16), jnp.int32))


def test_uint8_pixels_are_normalised_on_the_device(rng):
    """The pipeline sends uint8 pixels; the model's normalisation equals the host-side CLIP
    normalisation, so uint8 in gives the embeddings of normalised floats in."""
    from psd_jax.data import pipeline
    from psd_jax.models.clip import normalize_pixels
    pixels = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    host = pipeline.normalize(pixels)
    np.testing.assert_allclose(np.asarray(normalize_pixels(jnp.asarray(pixels))), host,
                               rtol=1e-6, atol=1e-6)
    model = build_model('tiny')
    tokens = rng.integers(1, 999, (3, 16)).astype(np.int32)
    params = model.init(jax.random.key(0), host, tokens)
    a = model.apply(params, pixels, tokens)['image']
    b = model.apply(params, host, tokens)['image']
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
