"""The hand-differentiated LayerNorm (psd_jax/models/norm.py) against float64 NumPy and against
flax's automatically differentiated LayerNorm, on fresh random inputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psd_jax.models.norm import LayerNorm

EPS = 1e-5


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
