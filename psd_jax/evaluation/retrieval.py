"""Image <-> text retrieval: Recall@K both directions, median and mean rank.

Captions map to images by `text_to_image` (M,), so an image may have several captions (COCO /
Flickr style); image -> text counts a hit at K when any of the image's captions ranks within K.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def _ranks_of_best_positive(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """scores (n, m), positive (n, m) bool -> (n,) 0-based rank of the best positive."""
    best = np.max(np.where(positive, scores, -np.inf), axis=1, keepdims=True)
    return np.sum(scores > best, axis=1)


def retrieval_metrics(image: np.ndarray, text: np.ndarray, text_to_image: np.ndarray | None = None,
                      chunk: int = 1024) -> dict[str, float]:
    """image (N, D), text (M, D) unit-norm; text_to_image (M,) the image index of each caption
    (default: caption i belongs to image i). Returns i2t/t2i R@1/5/10, median and mean rank
    (1-based)."""
    image, text = np.asarray(image, np.float32), np.asarray(text, np.float32)
    n, m = len(image), len(text)
    owner = np.arange(m) if text_to_image is None else np.asarray(text_to_image)
    if owner.shape != (m,):
        raise ValueError(f'text_to_image has shape {owner.shape}, expected ({m},)')
    if text_to_image is None and n != m:
        raise ValueError(f'{n} images and {m} captions: give text_to_image')
    if owner.min() < 0 or owner.max() >= n:
        raise ValueError('text_to_image holds indices outside the images')
    if len(np.unique(owner)) != n:
        raise ValueError('some images have no caption in text_to_image')
    i2t, t2i = [], []
    for start in range(0, n, chunk):
        scores = image[start:start + chunk] @ text.T
        positive = owner[None, :] == np.arange(start, start + len(scores))[:, None]
        i2t.append(_ranks_of_best_positive(scores, positive))
    for start in range(0, m, chunk):
        scores = text[start:start + chunk] @ image.T
        positive = np.arange(n)[None, :] == owner[start:start + chunk, None]
        t2i.append(_ranks_of_best_positive(scores, positive))
    out = {}
    for name, ranks in (('i2t', np.concatenate(i2t)), ('t2i', np.concatenate(t2i))):
        for k in KS:
            out[f'{name}_R@{k}'] = float(np.mean(ranks < k))
        out[f'{name}_median_rank'] = float(np.median(ranks) + 1)
        out[f'{name}_mean_rank'] = float(np.mean(ranks) + 1)
    return out
