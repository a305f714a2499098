"""The evaluators a config can list (`config.eval.evaluators`), run in the loop and standalone.

- `retrieval`: image <-> caption retrieval on `eval.split` of the training dataset (identical
  captions are interchangeable).
- `zero_shot`: classification of `eval.split`'s images into the dataset's classes
  (psd_jax.data.classnames) with its prompt templates.
- `linear_probe`: logistic regression on frozen image features of `eval.probe_dataset`
  (train split -> test split), at most `eval.probe_examples` training images.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from psd_jax.data import classnames
from psd_jax.data.from_config import eval_loader, open_split
from psd_jax.data.pipeline import Subset
from psd_jax.evaluation.embed import embed_batches
from psd_jax.evaluation.linear_probe import linear_probe
from psd_jax.evaluation.retrieval import retrieval_metrics
from psd_jax.evaluation.zero_shot import class_embeddings, zero_shot_metrics


def _embedded_split(config, model, variables, mesh, tokenizer, split, sample=None, **dataset):
    """Embeddings (and labels, caption ids) of a whole split, gathered from every host; with
    `sample` (an int n), of n of its records drawn by a fixed seed (only those are read)."""
    source = open_split(config, split, **dataset)
    if sample:
        chosen = np.random.default_rng(0).permutation(len(source))[:sample]
        source = Subset(source, chosen)
    per_host = math.ceil(len(source) / jax.process_count())
    return embed_batches(model, variables, eval_loader(config, source, tokenizer), mesh,
                         config.eval.batch, num_batches=math.ceil(per_host / config.eval.batch))


def retrieval(config, model, variables, mesh, tokenizer) -> dict[str, float]:
    emb = _embedded_split(config, model, variables, mesh, tokenizer, config.eval.split)
    return retrieval_metrics(emb['image'], emb['text'], text_group=emb['caption_id'])


def zero_shot(config, model, variables, mesh, tokenizer) -> dict[str, float]:
    emb = _embedded_split(config, model, variables, mesh, tokenizer, config.eval.split)
    if 'label' not in emb:
        raise ValueError(f'zero-shot classification needs labels; {config.data.dataset!r} '
                         f'split {config.eval.split!r} has none')
    classes = class_embeddings(model, variables, tokenizer,
                               classnames.class_names(config.data.dataset),
                               classnames.templates(config.data.dataset), mesh,
                               config.eval.batch, config.model.context_length)
    result = zero_shot_metrics(emb['image'], emb['label'], classes)
    return {k: v for k, v in result.items() if k != 'per_class'}


def linear_probe_on_frozen_features(config, model, variables, mesh,
                                    tokenizer) -> dict[str, float]:
    """Accuracy of logistic regression on frozen image embeddings of eval.probe_dataset."""
    dataset = {'dataset': config.eval.probe_dataset, 'builder_config': ''}
    train = _embedded_split(config, model, variables, mesh, tokenizer, 'train',
                            sample=config.eval.probe_examples, **dataset)
    test = _embedded_split(config, model, variables, mesh, tokenizer, 'test', **dataset)
    result = linear_probe(train['image'], train['label'], test['image'], test['label'])
    return {'accuracy': result['accuracy'], 'l2': result['l2']}


EVALUATORS: dict[str, Callable] = {'retrieval': retrieval, 'zero_shot': zero_shot,
                                   'linear_probe': linear_probe_on_frozen_features}


def run_evaluators(config: ml_collections.ConfigDict, model, variables: Any, mesh,
                   tokenizer) -> dict[str, float]:
    """{'eval/<evaluator>/<metric>': value} for every evaluator the config lists."""
    out = {}
    for name in config.eval.evaluators:
        if name not in EVALUATORS:
            raise ValueError(f'config.eval.evaluators: {name!r} is not known; allowed: '
                             f'{sorted(EVALUATORS)}')
        result = EVALUATORS[name](config, model, variables, mesh, tokenizer)
        out.update({f'eval/{name}/{k}': float(v) for k, v in result.items()})
    return out
