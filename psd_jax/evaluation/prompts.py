"""The class names and prompt templates a zero-shot benchmark uses, as the field uses them.

They come from the metadata `python -m psd_jax.data.fetch zero_shot_metadata` extracts from the
open-clip-torch and clip-benchmark wheels (psd_jax/data/wheel_metadata.py), from the dataset's
own label names, or, for the project's own sets, from psd_jax/data/classnames.py. Nothing of
the field's lists is kept in this repository.

`classifier_labels(bench, label_names)` -> (class names C, templates T, class_of_label) where
class_of_label maps the dataset's label ids to rows of the C classes (ImageNet-A and -R label
in the 1,000-class space but are scored over their own 200 classes, as CLIP_benchmark does;
-1: a label outside the classifier's classes).
"""

from __future__ import annotations

import functools
import json
from typing import Sequence

import numpy as np

from psd_jax.data import classnames, fetch
from psd_jax.evaluation.benchmarks import Benchmark


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    return json.loads(open(path, encoding='utf-8').read())


def metadata() -> dict:
    """The extracted metadata; FileNotFoundError naming the fetch command when it is missing."""
    path = fetch.cache_dir() / fetch.METADATA_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f'{path} is missing: the zero-shot class names and templates are fetched with '
            '`python -m psd_jax.data.fetch zero_shot_metadata` (set $PSD_JAX_CACHE to use '
            'another cache)')
    return _load(str(path))


def _cb(kind: str, key: str) -> list[str]:
    table = metadata()[kind]
    if key not in table:
        raise ValueError(f"CLIP_benchmark has no {kind} for {key!r}; it has {sorted(table)}")
    return list(table[key])


def _sun397(name: str) -> str:
    """'/a/apartment_building/outdoor' -> 'apartment building outdoor' (torchvision drops the
    '/a/' prefix, CLIP_benchmark turns '_' and '/' into spaces)."""
    return name[3:].replace('_', ' ').replace('/', ' ')


def templates(bench: Benchmark) -> list[str]:
    """The benchmark's prompt templates ('{}' is the class name's slot)."""
    source = bench.templates or 'project'
    if source.startswith('cb:'):
        return _cb('templates', source[3:])
    return list(classnames.templates(bench.dataset))


def classifier_labels(bench: Benchmark, label_names: Sequence[str] | None
                      ) -> tuple[list[str], list[str], np.ndarray | None]:
    """(class names, templates, class_of_label or None when labels are the classes' rows).
    `label_names`: the dataset's ClassLabel names (WordNet ids for the ImageNet sets)."""
    source = bench.names or 'project'
    mapping = None
    if source == 'imagenet':
        names = list(metadata()['open_clip']['classnames'])
    elif source == 'imagenet_subset':
        subset = set(metadata()['imagenet_subsets'][bench.dataset.split('/')[0]])
        if not label_names or len(label_names) != 1000:
            raise ValueError(f'{bench.dataset}: expected the 1,000 ImageNet WordNet ids as '
                             'label names')
        keep = [i for i, wnid in enumerate(label_names) if wnid in subset]
        all_names = metadata()['open_clip']['classnames']
        names = [all_names[i] for i in keep]
        mapping = np.full(len(label_names), -1, np.int64)
        mapping[keep] = np.arange(len(keep))
    elif source.startswith('cb:'):
        names = _cb('classnames', source[3:])
    elif source in ('labels', 'labels_spaces', 'labels_sun397'):
        if not label_names:
            raise ValueError(f'{bench.dataset}: its label feature has no names')
        rewrite = {'labels': str, 'labels_spaces': lambda n: n.replace('_', ' '),
                   'labels_sun397': _sun397}[source]
        names = [rewrite(n) for n in label_names]
    else:
        names = list(classnames.class_names(bench.dataset))
    if mapping is None and label_names is not None and len(label_names) != len(names):
        raise ValueError(f'{bench.dataset}: {len(label_names)} labels but {len(names)} class '
                         f'names from {source!r}: the class-name list does not match the data')
    return names, templates(bench), mapping
