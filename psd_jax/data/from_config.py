"""The input side as an experiment config describes it: tokenizer, data sources, loaders."""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from psd_jax.data import datasets, fetch, pipeline
from psd_jax.data.tokenizers import ClipTokenizer, SentencePieceTokenizer


def make_tokenizer(config: ml_collections.ConfigDict) -> Callable:
    if config.data.tokenizer == 'clip':
        return ClipTokenizer(config.data.vocab_path or fetch.clip_vocab(),
                             config.model.context_length)
    return SentencePieceTokenizer(config.data.vocab_path, config.model.context_length)


def open_split(config: ml_collections.ConfigDict, split: str, dataset: str | None = None,
               builder_config: str | None = None, path: str | None = None) -> Any:
    """A split's random-access source (default: the training dataset), preparing the dataset
    first when the project knows how (process 0 prepares, the others wait)."""
    dataset = dataset or config.data.dataset
    if dataset == config.data.dataset and builder_config is None:
        builder_config, path = config.data.builder_config, config.data.path
    data_dir = config.data.data_dir or None
    if dataset in datasets.BUILDERS:
        if jax.process_index() == 0:
            datasets.prepare(dataset, data_dir, builder_config or None, path or None)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices('dataset prepared')
    name = f'{dataset}/{builder_config}' if builder_config else dataset
    return datasets.data_source(name, split, data_dir)


def eval_loader(config: ml_collections.ConfigDict, source: Any, tokenizer: Callable,
                keep=('label', 'caption')) -> Any:
    """One ordered pass over `source` in evaluation batches (resize + centre crop)."""
    return pipeline.make_loader(
        source, global_batch=config.eval.batch * jax.process_count(),
        image_size=config.model.image_size, tokenizer=tokenizer,
        context_length=config.model.context_length, train=False, keep=keep,
        drop_remainder=False)
