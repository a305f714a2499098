"""model.patch_dropout (FLIP): in training a ViT keeps a random subset of each image's patch
tokens (after their positions are added) and the class token; evaluation keeps all. The
GradCache recompute sees the same dropped patches as the first pass, so accumulation with patch
dropout still gives the gradient of the embeddings it computed."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psd_jax.training import accumulate
from psd_jax.models import build_model
from psd_jax.models.vit import VisionTransformer


def test_training_keeps_a_random_subset_of_each_images_patches(rng):
    vit = VisionTransformer(image_size=32, patch_size=8, width=16, depth=1, heads=2,
                            embed_dim=8, patch_dropout=0.5)
    x = jnp.asarray(rng.normal(size=(3, 17, 16)), jnp.float32)  # class token + 16 patches
    bound = vit.bind({}, rngs={'dropout': jax.random.key(int(rng.integers(1 << 30)))})
    kept = np.asarray(bound._drop_patches(x))
    assert kept.shape == (3, 9, 16)  # the class token + round(16 x 0.5)
    np.testing.assert_array_equal(kept[:, 0], x[:, 0])
    chosen = []
    for b in range(3):
        rows = [int(np.flatnonzero((np.asarray(x[b, 1:]) == row).all(axis=1))[0])
                for row in kept[b, 1:]]
        assert len(set(rows)) == 8  # distinct patches of this image
        chosen.append(tuple(sorted(rows)))
    assert len(set(chosen)) > 1  # each image draws its own


def test_evaluation_and_zero_dropout_keep_every_patch(rng):
    images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
    tokens = jnp.asarray(rng.integers(1, 999, (2, 16)), jnp.int32)
    plain, dropped = build_model('tiny'), build_model('tiny', patch_dropout=0.5)
    params = plain.init(jax.random.key(0), images, tokens)
    rngs = {'dropout': jax.random.key(1)}
    a = plain.apply(params, images, tokens, train=True, rngs=rngs)['image']
    b = dropped.apply(params, images, tokens, train=False)['image']
    c = dropped.apply(params, images, tokens, train=True, rngs=rngs)['image']
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    with pytest.raises(ValueError, match='model.patch_dropout'):
        build_model('RN50', patch_dropout=0.5)


def test_gradcache_recomputes_the_same_dropped_patches(rng):
    """accumulate.grads with k = 2 micro-batches equals differentiating the loss of the
    micro-batches' embeddings, each computed with its own key split(rng, k)[j]."""
    model = build_model('tiny', patch_dropout=0.5)
    images = jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3)), jnp.uint8)
    tokens = jnp.asarray(rng.integers(1, 999, (8, 16)), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), images, tokens)['params'])
    weights = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))

    def embed(p, mb):
        return model.apply({'params': p}, mb['image'], mb['text'], train=True,
                           rngs={'dropout': mb['rng']})

    def loss_of(out):
        scores = out['image'] @ out['text'].T * jnp.exp(out['logit_scale'])
        return jnp.sum(weights * scores), ()

    (loss, _), grads, _ = accumulate.grads(embed, params, {'image': images, 'text': tokens},
                                           loss_of, 2, 1, key)

    def direct(p):
        keys = jax.random.split(key, 2)
        outs = [embed(p, {'image': images[4 * j:4 * j + 4], 'text': tokens[4 * j:4 * j + 4],
                          'rng': keys[j]}) for j in range(2)]
        return loss_of({'image': jnp.concatenate([o['image'] for o in outs]),
                        'text': jnp.concatenate([o['text'] for o in outs]),
                        'logit_scale': p['logit_scale']})[0]

    loss0, grads0 = jax.value_and_grad(direct)(params)
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads0))
    for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale)
