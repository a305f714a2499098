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
    emb = embed_batches(model, variables, eval_loader(config, source, tokenizer), mesh,
                        config.eval.batch, num_batches=math.ceil(per_host / config.eval.batch))
    check_finite(emb, f'{dataset.get("dataset", config.data.dataset)} split {split!r}')
    return emb


class NonFiniteEmbeddings(ValueError):
    """The model gives NaN or infinite embeddings: no metric of it means anything."""


def check_finite(embeddings: dict[str, np.ndarray], what: str) -> None:
    """Refuse to score embeddings that are not all finite (a diverged model)."""
    for key in ('image', 'text'):
        if key in embeddings:
            bad = int(np.sum(~np.all(np.isfinite(embeddings[key]), axis=1)))
            if bad:
                raise NonFiniteEmbeddings(
                    f'{what}: {bad} of {len(embeddings[key])} {key} embeddings are not finite '
                    '(the model diverged); no evaluation is reported for it')


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


class EvaluationFailed(ValueError):
    """One or more evaluators failed; `partial` holds the results of those that did not."""

    def __init__(self, message: str, partial: dict[str, float]):
        super().__init__(message)
        self.partial = partial


def run_evaluators(config: ml_collections.ConfigDict, model, variables: Any, mesh,
                   tokenizer) -> dict[str, float]:
    """{'eval/<evaluator>/<metric>': value} for every evaluator the config lists. Every
    evaluator runs even when an earlier one fails; then EvaluationFailed names the failures
    and carries the others' results."""
    check_names(config)
    out, errors = {}, []
    for name in config.eval.evaluators:
        try:
            result = EVALUATORS[name](config, model, variables, mesh, tokenizer)
        except (ValueError, FileNotFoundError) as e:
            errors.append(f'{name}: {e}')
            continue
        out.update({f'eval/{name}/{k}': float(v) for k, v in result.items()})
    if errors:
        raise EvaluationFailed('evaluation failed: ' + '; '.join(errors), out)
    return out


def check_names(config: ml_collections.ConfigDict) -> None:
    for name in config.eval.evaluators:
        if name not in EVALUATORS:
            raise ValueError(f'config.eval.evaluators: {name!r} is not known; allowed: '
                             f'{sorted(EVALUATORS)}')


def _features(source) -> dict:
    return dict(getattr(getattr(source, 'dataset_info', None), 'features', {}) or {})


def check_evaluators(config: ml_collections.ConfigDict) -> None:
    """Before training: every evaluator is known, and its data exists and has what it needs
    (the split, labels and class names for zero-shot, the probe dataset's train and test
    splits with labels), so that no error waits for the end of training."""
    check_names(config)
    wanted = set(config.eval.evaluators)
    if wanted & {'retrieval', 'zero_shot'}:
        try:
            source = open_split(config, config.eval.split)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f'config.eval.split={config.eval.split!r}: {e}') from e
        if 'zero_shot' in wanted:
            if 'label' not in _features(source):
                raise ValueError(
                    f'config.eval.evaluators: zero_shot needs labels, and '
                    f'{config.data.dataset!r} split {config.eval.split!r} has only '
                    f'{sorted(_features(source))}; drop zero_shot from eval.evaluators')
            classnames.class_names(config.data.dataset)
    if 'linear_probe' in wanted:
        for split in ('train', 'test'):
            try:
                source = open_split(config, split, dataset=config.eval.probe_dataset,
                                    builder_config='')
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f'config.eval.probe_dataset={config.eval.probe_dataset!r}: '
                                 f'{e}') from e
            if 'label' not in _features(source):
                raise ValueError(f'config.eval.probe_dataset={config.eval.probe_dataset!r} '
                                 f'split {split!r} has no labels for the linear probe')
