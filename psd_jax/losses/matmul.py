"""The similarity matmuls of every loss, at the precision `loss.precision` names.

float32: float32 inputs at HIGHEST precision (exact float32 products; the default, and what the
parity tests hold to 1e-5). bfloat16: inputs rounded to bfloat16, products accumulated in
float32 (one MXU / tensor-core pass on accelerators; tests/test_losses.py states the tolerance
this gives). Outputs are float32 either way, so the softmaxes and reductions stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = ('float32', 'bfloat16')


def matmul(subscripts: str, a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
    """jnp.einsum(subscripts, a, b) in float32, at `precision` (one of PRECISIONS)."""
    if precision == 'bfloat16':
        return jnp.einsum(subscripts, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32)
    if precision != 'float32':
        raise ValueError(f'loss.precision={precision!r} is not known; allowed: '
                         f'{list(PRECISIONS)}')
    return jnp.einsum(subscripts, a, b, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
