"""Linear probe: multinomial logistic regression on frozen features, solved with L-BFGS in JAX.

The L2 strength is chosen on a validation split held out from the training features, then the
probe is refit on all training features and scored on the test features. Features are
standardised with the training statistics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_L2 = tuple(float(x) for x in np.logspace(-6, 0, 7))


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iter'))
def fit_logistic(x: jax.Array, y: jax.Array, l2: float, *, num_classes: int,
                 max_iter: int = 300, tol: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """Minimise mean cross-entropy + l2/2 |W|^2 over W (D, C), b (C,) for x (N, D), y (N,)."""
    onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)

    def loss(params):
        w, b = params
        logits = x @ w + b
        ce = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.sum(onehot * logits, axis=1))
        return ce + 0.5 * l2 * jnp.sum(w * w)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)
    params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))

    def body(carry):
        params, state, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=loss)
        return optax.apply_updates(params, updates), state, optax.tree.norm(grad)

    def keep_going(carry):
        _, state, grad_norm = carry
        return (optax.tree_utils.tree_get(state, 'count') < max_iter) & (grad_norm > tol)

    init = (params, solver.init(params), jnp.asarray(jnp.inf, x.dtype))
    params, _, _ = jax.lax.while_loop(keep_going, body, init)
    return params


def accuracy(params, x: np.ndarray, y: np.ndarray) -> float:
    w, b = params
    return float(np.mean(np.argmax(np.asarray(x @ np.asarray(w) + np.asarray(b)), 1) == y))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, l2_grid=DEFAULT_L2, validation_fraction: float = 0.1,
                 seed: int = 0, max_iter: int = 300) -> dict[str, float]:
    """Test accuracy of a logistic-regression probe, L2 picked on a held-out validation split.

    train_x (N, D), train_y (N,) int; test_x (M, D), test_y (M,). Returns test accuracy, the
    chosen L2 and its validation accuracy.
    """
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError('features and labels differ in length')
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    order = np.random.default_rng(seed).permutation(len(train_x))
    n_val = max(1, int(round(validation_fraction * len(train_x))))
    val, fit = order[:n_val], order[n_val:]
    scores = {}
    for l2 in l2_grid:
        params = fit_logistic(train_x[fit], train_y[fit], l2, num_classes=num_classes,
                              max_iter=max_iter)
        scores[l2] = accuracy(params, train_x[val], train_y[val])
    best = max(scores, key=lambda l2: (scores[l2], l2))  # ties: the stronger regulariser
    params = fit_logistic(train_x, train_y, best, num_classes=num_classes, max_iter=max_iter)
    return {'accuracy': accuracy(params, test_x, test_y), 'l2': best,
            'validation_accuracy': scores[best]}
