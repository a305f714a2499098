"""The input side as an experiment config describes it: tokenizer, data sources, loaders."""

from __future__ import annotations

from typing import Any, Callable, Collection, Iterator

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
               builder_config: str | None = None, path: str | None = None,
               data_dir: str | None = None) -> Any:
    """A split's random-access source (default: the training dataset), preparing the dataset
    first when the project knows how: on one host; on several, process 0 prepares the small
    demo sets while the others wait, and the user's path-based datasets must have been
    prepared beforehand (datasets.require_prepared says how). `data_dir`: where it is prepared
    (default data.data_dir, else the cache)."""
    dataset = dataset or config.data.dataset
    if dataset == config.data.dataset and builder_config is None:
        builder_config, path = config.data.builder_config, config.data.path
    data_dir = data_dir or config.data.data_dir or None
    if dataset in datasets.CONFIGS and jax.process_count() > 1:
        # the user's data on a pod: prepared beforehand, never by the run (every host checks)
        datasets.require_prepared(dataset, data_dir, builder_config or None, path or None)
    elif dataset in datasets.BUILDERS:  # one host; or the small demo sets, which process 0
        if jax.process_index() == 0:    # prepares in seconds while the others wait
            datasets.prepare(dataset, data_dir, builder_config or None, path or None)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices('dataset prepared')
    name = f'{dataset}/{builder_config}' if builder_config else dataset
    return datasets.data_source(name, split, data_dir)


def noisy_captions(config: ml_collections.ConfigDict, source: Any) -> Any:
    """The training source with `data.caption_noise` of its captions corrupted as
    `data.caption_noise_kind` says (grouped kinds use `data.caption_noise_group`)."""
    group = config.data.caption_noise_group
    names = None
    if config.data.caption_noise_kind == 'group_name':
        features = getattr(getattr(source, 'dataset_info', None), 'features', {})
        if group not in features:
            raise ValueError(f'config.data.caption_noise_group={group!r}: the dataset has no '
                             f'such class feature; it has {sorted(features)}')
        names = features[group].names
    return pipeline.CaptionNoise(source, config.data.caption_noise, config.seed,
                                 kind=config.data.caption_noise_kind, group_key=group,
                                 group_names=names)


def training_source(config: ml_collections.ConfigDict) -> Any:
    """`data.train_split` of the training dataset, with caption noise when configured."""
    source = open_split(config, config.data.train_split)
    return noisy_captions(config, source) if config.data.caption_noise else source


def training_loader(config: ml_collections.ConfigDict, source: Any, tokenizer: Callable,
                    batch_keys: Collection[str], repeated_pairs: int = 0,
                    start_batch: int = 0) -> Iterator[dict]:
    """This host's training batches from global batch `start_batch` on, with exactly
    `batch_keys` (from step.batch_spec): 'teacher_image' and 'index' only when the step takes
    them. `repeated_pairs`: pairs of each batch repeated from the previous (previous-step
    teacher)."""
    if 'index' in batch_keys:
        source = pipeline.WithIndex(source)
    return iter(pipeline.make_loader(
        source, global_batch=config.data.global_batch, image_size=config.model.image_size,
        tokenizer=tokenizer, context_length=config.model.context_length, train=True,
        seed=config.seed, worker_count=config.data.workers,
        keep=('index',) if 'index' in batch_keys else (),
        teacher_view='teacher_image' in batch_keys, crop_scale=tuple(config.data.crop_scale),
        start_batch=start_batch, repeated_pairs=repeated_pairs,
        read_threads=config.data.read_threads, read_ahead=config.data.read_ahead))


def eval_loader(config: ml_collections.ConfigDict, source: Any, tokenizer: Callable,
                keep=('label', 'caption')) -> Any:
    """One ordered pass over `source` in evaluation batches (resize + centre crop)."""
    return pipeline.make_loader(
        source, global_batch=config.eval.batch * jax.process_count(),
        image_size=config.model.image_size, tokenizer=tokenizer,
        context_length=config.model.context_length, train=False, keep=keep,
        drop_remainder=False, read_threads=config.data.read_threads,
        read_ahead=config.data.read_ahead)
