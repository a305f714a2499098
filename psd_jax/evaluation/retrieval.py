"""Image <-> text retrieval: Recall@K both directions, median and mean rank.

Captions map to images by `text_to_image` (M,), so an image may have several captions (COCO /
Flickr style). Captions with the same `text_group` id (e.g. identical strings) are
interchangeable, so when several images share a caption each of them counts as a hit for it,
and any caption of the group counts for each of those images. A query scores a hit at K when
any of its positives ranks within K.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KS = (1, 5, 10)


def _ranks_of_best_positive(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """scores (n, m), positive (n, m) bool -> (n,) 0-based rank of the best positive.

    Pessimistic: every negative whose score is not strictly below the best positive counts
    above it, so ties and NaN scores are misses and a constant or NaN model ranks last (a
    NaN positive is no positive at all)."""
    best = np.max(np.where(positive & ~np.isnan(scores), scores, -np.inf), axis=1,
                  keepdims=True)
    return np.sum(~positive & ~(scores < best), axis=1)


def caption_groups(captions: Sequence[str | bytes]) -> np.ndarray:
    """(M,) group ids: equal caption strings share an id."""
    return np.unique(np.asarray([c.decode() if isinstance(c, bytes) else c for c in captions]),
                     return_inverse=True)[1]


def retrieval_metrics(image: np.ndarray, text: np.ndarray, text_to_image: np.ndarray | None = None,
                      text_group: np.ndarray | None = None, chunk: int = 1024
                      ) -> dict[str, float]:
    """image (N, D), text (M, D) unit-norm; text_to_image (M,) the image of each caption
    (default: caption i belongs to image i); text_group (M,) interchangeable-caption ids
    (default: all distinct). Returns i2t/t2i R@1/5/10, median and mean rank (1-based)."""
    image, text = np.asarray(image, np.float32), np.asarray(text, np.float32)
    n, m = len(image), len(text)
    owner = np.arange(m) if text_to_image is None else np.asarray(text_to_image)
    group = np.arange(m) if text_group is None else np.asarray(text_group)
    if owner.shape != (m,) or group.shape != (m,):
        raise ValueError(f'text_to_image {owner.shape} and text_group {group.shape} must both '
                         f'be ({m},): one entry per caption')
    if text_to_image is None and n != m:
        raise ValueError(f'{n} images and {m} captions: give text_to_image')
    if owner.min() < 0 or owner.max() >= n:
        raise ValueError('text_to_image holds indices outside the images')
    if len(np.unique(owner)) != n:
        raise ValueError('some images have no caption in text_to_image')
    _, group = np.unique(group, return_inverse=True)
    n_groups = group.max() + 1
    images_of_group = [[] for _ in range(n_groups)]
    for j in range(m):
        images_of_group[group[j]].append(owner[j])
    i2t, t2i = [], []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        has_group = np.zeros((stop - start, n_groups), bool)  # image -> groups of its captions
        mine = (owner >= start) & (owner < stop)
        has_group[owner[mine] - start, group[mine]] = True
        i2t.append(_ranks_of_best_positive(image[start:stop] @ text.T, has_group[:, group]))
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        positive = np.zeros((stop - start, n), bool)
        for row, j in enumerate(range(start, stop)):
            positive[row, images_of_group[group[j]]] = True
        t2i.append(_ranks_of_best_positive(text[start:stop] @ image.T, positive))
    out = {}
    for name, ranks in (('i2t', np.concatenate(i2t)), ('t2i', np.concatenate(t2i))):
        for k in KS:
            out[f'{name}_R@{k}'] = float(np.mean(ranks < k))
        out[f'{name}_median_rank'] = float(np.median(ranks) + 1)
        out[f'{name}_mean_rank'] = float(np.mean(ranks) + 1)
    return out
