"""Independent float64 NumPy references of the losses and their gradients.

Written from the formulas in docs/design.md ("The losses"), not from the library: dense B x B
matrices, explicit soft targets q, and analytic gradients (d loss / d logits = p - q per
direction).
"""

from __future__ import annotations

import numpy as np


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _masked_softmax_rows(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        cols = np.flatnonzero(valid[i])
        if cols.size == 0:
            out[i, i] = 1.0
            continue
        z = x[i, cols] - x[i, cols].max()
        out[i, cols] = np.exp(z) / np.exp(z).sum()
    return out


def _teacher(s, teacher, temperature, remove_diagonal):
    """The teacher's distributions (rows: image -> captions, columns: caption -> images)."""
    n = s.shape[0]
    if teacher is None:
        tl = s / temperature
        cols = np.ones(n, bool)
    else:
        ut, vt, lst, cols = teacher
        ts = float(np.exp(min(float(lst), np.log(100.0)))) / temperature
        tl = ts * np.asarray(ut, np.float64) @ np.asarray(vt, np.float64).T
        cols = np.asarray(cols, bool)
    valid = np.broadcast_to(cols[None, :], (n, n)).copy()
    if remove_diagonal:
        valid &= ~np.eye(n, dtype=bool)
    return _masked_softmax_rows(tl, valid), _masked_softmax_rows(tl.T, valid)


def psd_reference(u, v, logit_scale, subset=None, alpha=0.0, teacher=None,
                  teacher_temperature=1.0, remove_diagonal=False, soft_weight='constant'):
    """Loss, parts, gradients (d/du, d/dv, d/dlogit_scale) and their magnitudes in float64.
    soft_weight: 'constant' (each subset row's teacher share is alpha) or 'off_diagonal' (alpha
    times 1 - the teacher's probability of the row's own pair; a constant of the student, like
    the targets).

    d/dlogit_scale = sum_ij (d loss / d s_ij) s_ij cancels between positive and negative terms;
    its magnitude is the sum of the terms' absolute values, the scale of float32 rounding.

    u, v: (B, D) unit-norm; subset: (B,) bool or None (CLIP); teacher: None (same pass) or
    (u_t, v_t, logit_scale_t, column_mask).
    """
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    n = u.shape[0]
    t = float(np.exp(min(float(logit_scale), np.log(100.0))))
    s = t * u @ v.T  # rows: images, columns: captions
    eye = np.eye(n)
    if subset is None:
        subset = np.zeros(n, bool)
        alpha = 0.0
    subset = np.asarray(subset, bool)
    p_teacher_rows, p_teacher_cols = _teacher(s, teacher, teacher_temperature, remove_diagonal)
    w = alpha * subset.astype(np.float64)
    w_rows = w_cols = w
    if soft_weight == 'off_diagonal':  # a times the teacher's mass off the row's own pair
        w_rows = w * (1 - np.diag(p_teacher_rows))
        w_cols = w * (1 - np.diag(p_teacher_cols))
    q_rows = (1 - w_rows)[:, None] * eye + w_rows[:, None] * p_teacher_rows
    q_cols = (1 - w_cols)[:, None] * eye + w_cols[:, None] * p_teacher_cols

    def direction(logits, q):
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        loss = lse - (q * logits).sum(1)
        return loss, _softmax(logits, 1) - q

    loss_r, g_r = direction(s, q_rows)
    loss_c, g_c = direction(s.T, q_cols)
    loss = (loss_r.sum() + loss_c.sum()) / (2 * n)
    d_s = (g_r + g_c.T) / (2 * n)  # d loss / d s
    grad_u = t * d_s @ v
    grad_v = t * d_s.T @ u
    grad_scale = (d_s * s).sum() if float(logit_scale) < np.log(100.0) else 0.0  # clip at 100
    hard_r, _ = direction(s, eye)
    hard_c, _ = direction(s.T, eye)
    soft_r, _ = direction(s, p_teacher_rows)
    soft_c, _ = direction(s.T, p_teacher_cols)
    k = subset.sum()
    parts = {'clip': (hard_r.sum() + hard_c.sum()) / (2 * n),
             'distill': (soft_r[subset].sum() + soft_c[subset].sum()) / (2 * max(k, 1)),
             'subset_size': float(k),
             'soft_weight': (w_rows[subset].sum() + w_cols[subset].sum()) / (2 * max(k, 1))}
    magnitudes = (np.abs(grad_u).max(), np.abs(grad_v).max(), np.abs(d_s * s).sum())
    return loss, parts, (grad_u, grad_v, grad_scale), magnitudes


def sigmoid_reference(u, v, logit_scale, logit_bias):
    """SigLIP loss, gradients (d/du, d/dv, d/dlogit_scale, d/dbias) and magnitudes, in float64.

    The scalar gradients are sums of B*B terms of both signs; the returned magnitudes (the sums
    of the terms' absolute values) are the scale float32 rounding is measured against.
    """
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    n = u.shape[0]
    t = float(np.exp(min(float(logit_scale), np.log(100.0))))
    z = 2 * np.eye(n) - 1
    x = t * u @ v.T + float(logit_bias)
    loss = np.logaddexp(0.0, -z * x).sum() / n        # -log sigmoid(z x)
    d_x = -z / (1 + np.exp(z * x)) / n                # d/dx of -log sigmoid(z x)
    grad_u = t * d_x @ v
    grad_v = t * d_x.T @ u
    grad_scale = (d_x * (x - float(logit_bias))).sum()
    grad_bias = d_x.sum()
    magnitudes = (np.abs(grad_u).max(), np.abs(grad_v).max(),
                  np.abs(d_x * (x - float(logit_bias))).sum(), np.abs(d_x).sum())
    return loss, (grad_u, grad_v, grad_scale, grad_bias), magnitudes
