"""The model's own layers against float64 NumPy and against flax's layers, on fresh random
inputs: the dense layer (psd_jax/models/dense.py: a flattened 2-D matmul, differentiated
automatically, forward mode included) and LayerNorm with its closed-form backward (norm.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psd_jax.models.dense import Dense
from psd_jax.models.norm import LayerNorm

EPS = 1e-5


@pytest.mark.parametrize('in_shape,features', [((24,), (40,)),    # widening
                                               ((40,), (24,)),    # narrowing
                                               ((2, 12), (24,)),  # attention's output proj.
                                               ((24,), (3, 2, 4))])  # fused qkv
def test_dense_value_and_gradients_equal_float64(in_shape, features, rng):
    x = rng.normal(size=(3, 5, *in_shape)).astype(np.float32)
    dense = Dense(features, in_axes=len(in_shape),
                  kernel_init=nn.initializers.normal(0.3), bias_init=nn.initializers.normal(0.3))
    params = nn.meta.unbox(dense.init(jax.random.key(int(rng.integers(1 << 30))), x))['params']
    w = rng.normal(size=(3, 5, *features)).astype(np.float32)  # the cotangent

    def loss(p, x):
        return jnp.sum(dense.apply({'params': p}, x) * w)

    value, (grads, dx) = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    k, m = int(np.prod(in_shape)), int(np.prod(features))
    x64 = x.reshape(15, k).astype(np.float64)
    kernel = np.asarray(params['kernel'], np.float64).reshape(k, m)
    bias = np.asarray(params['bias'], np.float64).reshape(m)
    w64 = w.reshape(15, m).astype(np.float64)
    terms = (x64 @ kernel + bias) * w64  # the value is their sum, which can nearly cancel
    np.testing.assert_allclose(value, terms.sum(), rtol=0, atol=1e-6 * np.abs(terms).sum())
    np.testing.assert_allclose(np.asarray(grads['kernel']).reshape(k, m), x64.T @ w64,
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads['bias']).reshape(m), w64.sum(0), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx).reshape(15, k), w64 @ kernel.T, rtol=1e-5,
                               atol=1e-4)
    # forward mode too (a custom VJP would refuse it): d/dt dense(x + t v) = v @ kernel
    v = rng.normal(size=x.shape).astype(np.float32)
    _, tangent = jax.jvp(lambda x: dense.apply({'params': params}, x), (x,), (v,))
    np.testing.assert_allclose(np.asarray(tangent).reshape(15, m),
                               v.reshape(15, k).astype(np.float64) @ kernel, rtol=1e-5, atol=1e-4)


def test_dense_keeps_flax_parameters_and_initialisation():
    """Same parameter shapes and initial values as flax's Dense / DenseGeneral (checkpoints
    and seeds carry over)."""
    x = jnp.ones((2, 3, 8))
    init = nn.initializers.normal(0.02)
    ours = Dense((3, 2, 4), kernel_init=init).init(jax.random.key(1), x)['params']
    flax_ = nn.DenseGeneral((3, 2, 4), kernel_init=init).init(jax.random.key(1), x)['params']
    np.testing.assert_array_equal(ours['kernel'], flax_['kernel'])
    ours = Dense((8,), in_axes=2, kernel_init=init).init(jax.random.key(2), x.reshape(2, 3, 2, 4))
    flax_ = nn.DenseGeneral(8, axis=(-2, -1), kernel_init=init).init(
        jax.random.key(2), x.reshape(2, 3, 2, 4))
    np.testing.assert_array_equal(ours['params']['kernel'], flax_['params']['kernel'])


def _layer_norm64(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * scale + bias


def test_layer_norm_value_and_gradients_equal_float64(rng):
    """Forward against float64 NumPy; gradients against central differences of the float64
    forward (an independent route to the closed-form backward)."""
    x = (rng.normal(size=(2, 3, 6)) * 2 + 1).astype(np.float32)
    scale = rng.normal(size=6).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    w = rng.normal(size=x.shape)
    module = LayerNorm(epsilon=EPS)
    params = {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}

    def loss(p, x):
        return jnp.sum(module.apply({'params': p}, x) * w)

    value, (grads, dx) = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    x64, s64, b64 = (a.astype(np.float64) for a in (x, scale, bias))
    np.testing.assert_allclose(value, np.sum(_layer_norm64(x64, s64, b64) * w), rtol=1e-5,
                               atol=1e-4)

    def numeric(f, a, h=1e-6):
        g = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            up, down = a.copy(), a.copy()
            up[i] += h
            down[i] -= h
            g[i] = (f(up) - f(down)) / (2 * h)
        return g

    np.testing.assert_allclose(dx, numeric(lambda a: np.sum(_layer_norm64(a, s64, b64) * w),
                                           x64), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads['scale'], numeric(
        lambda a: np.sum(_layer_norm64(x64, a, b64) * w), s64), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads['bias'], numeric(
        lambda a: np.sum(_layer_norm64(x64, s64, a) * w), b64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_layer_norm_equals_flax_in_each_compute_dtype(dtype, tol, rng):
    """bfloat16 compute: statistics and the backward in float32 as flax's. Each output and
    gradient within `tol` of its largest magnitude (bfloat16 rounds to 2^-8 relative). The
    tolerance can fail a backward that misses a term: dx without its -xhat mean(g xhat) part
    (computed in float64 on the same inputs) is shown to lie outside it."""
    x = jnp.asarray(rng.normal(size=(4, 5, 16)) * 3 + 1, dtype)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    params = {'scale': jnp.asarray(rng.normal(size=16), jnp.float32),
              'bias': jnp.asarray(rng.normal(size=16), jnp.float32)}
    results = []
    for module in (LayerNorm(epsilon=EPS, dtype=dtype), nn.LayerNorm(epsilon=EPS, dtype=dtype)):
        def loss(p, x, module=module):
            y = module.apply({'params': p}, x)
            assert y.dtype == dtype
            return jnp.sum(y.astype(jnp.float32) * w)
        results.append(jax.value_and_grad(loss, argnums=(0, 1))(params, x))
    (v0, (g0, dx0)), (v1, (g1, dx1)) = results

    def close(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.max(np.abs(a - b)) <= tol * np.max(np.abs(b))

    assert close(v0, v1)
    for name, a, b in [('scale', g0['scale'], g1['scale']), ('bias', g0['bias'], g1['bias']),
                       ('dx', dx0, dx1)]:
        assert close(a, b), name
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    rstd = 1 / np.sqrt(var + EPS)
    xhat, g = (x64 - mean) * rstd, np.asarray(w, np.float64) * np.asarray(params['scale'])
    missing = rstd * (g - g.mean(-1, keepdims=True))  # dx without -xhat mean(g xhat)
    assert not close(missing, dx1)
