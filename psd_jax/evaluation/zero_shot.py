"""Zero-shot classification: class names x prompt templates -> class embeddings -> accuracy."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from psd_jax.evaluation.embed import embed_tokens


def class_embeddings(model, variables: Any, tokenizer: Callable, class_names: Sequence[str],
                     templates: Sequence[str], mesh, batch_size: int,
                     context_length: int) -> np.ndarray:
    """(C, D): each class's prompts embedded, averaged over templates, re-normalised."""
    if not class_names or not templates:
        raise ValueError('zero-shot needs at least one class name and one template')
    bad = [t for t in templates if '{}' not in t]
    if bad:
        raise ValueError(f'templates without a {{}} slot for the class name: {bad}')
    prompts = [t.format(c) for c in class_names for t in templates]
    tokens = np.asarray(tokenizer(prompts, context_length))
    emb = embed_tokens(model, variables, tokens, mesh, batch_size)
    emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def zero_shot_metrics(image: np.ndarray, labels: np.ndarray | None,
                      classes: np.ndarray) -> dict[str, Any]:
    """image (N, D) unit-norm, labels (N,) ints, classes (C, D) -> top-1, top-5 accuracy and
    per-class accuracy (C,) (NaN for classes without images)."""
    if labels is None:
        raise ValueError('zero-shot classification needs labels; this dataset has none')
    labels = np.asarray(labels)
    if labels.shape != (len(image),):
        raise ValueError(f'{len(image)} images but labels of shape {labels.shape}')
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f'labels run up to {labels.max()} but there are {len(classes)} class '
                         'names: the class-name list does not match the labels')
    scores = np.asarray(image, np.float32) @ np.asarray(classes, np.float32).T
    k = min(5, len(classes))
    # rank of the true class among the others, counting ties and NaN against it (so a
    # constant or NaN model classifies nothing)
    true = scores[np.arange(len(labels)), labels][:, None]
    true = np.where(np.isnan(true), -np.inf, true)
    others = np.arange(len(classes))[None, :] != labels[:, None]
    rank = np.sum(others & ~(scores < true), axis=1)
    hit1, hitk = rank < 1, rank < k
    per_class = np.array([hit1[labels == c].mean() if np.any(labels == c) else np.nan
                          for c in range(len(classes))])
    return {'top1': float(hit1.mean()), f'top{k}': float(hitk.mean()), 'per_class': per_class,
            'mean_per_class': float(np.nanmean(per_class))}
