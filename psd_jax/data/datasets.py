"""The project's datasets by name: prepare them (once) to ArrayRecord and open data sources.

    python -m psd_jax.data.datasets emoji emoji_styles fashion_mnist_local   # into the cache
    python -m psd_jax.data.datasets image_text_shards --path /data/mine --config mine

Prepared data lives in `<data_dir>` (default `$PSD_JAX_CACHE/tfds`). Reading goes through
`tfds.data_source`, which needs no TensorFlow.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from psd_jax.data import builders, fetch
from psd_jax.data.emoji import Emoji
from psd_jax.data.emoji_styles import EmojiStyles
from psd_jax.data.fashion_mnist import FashionMnistConfig, FashionMnistLocal

BUILDERS = {
    'emoji': Emoji,
    'emoji_styles': EmojiStyles,
    'fashion_mnist_local': FashionMnistLocal,
    'image_text_shards': builders.ImageTextShards,
    'image_folder_classification': builders.ImageFolderClassification,
}
CONFIGS = {
    'fashion_mnist_local': FashionMnistConfig,
    'image_text_shards': builders.ImageTextShardsConfig,
    'image_folder_classification': builders.ImageFolderConfig,
}


def default_data_dir() -> pathlib.Path:
    return fetch.cache_dir() / 'tfds'


def prepare(name: str, data_dir: str | pathlib.Path | None = None, config: str | None = None,
            path: str | None = None) -> tfds.core.DatasetBuilder:
    """Build dataset `name` to ArrayRecord unless already prepared; returns its builder.

    `config` picks a named builder config (emoji: 'label' or 'label_keywords'); `path` points
    the path-based builders (image_text_shards, image_folder_classification,
    fashion_mnist_local) at the user's files, under the config name `config` (default 'default').
    """
    if name not in BUILDERS:
        raise ValueError(f'dataset {name!r} is not known; allowed: {sorted(BUILDERS)} (tfds '
                         'catalog sets are prepared with their own builders)')
    data_dir = str(data_dir or default_data_dir())
    kwargs: dict[str, Any] = {'data_dir': data_dir}
    if path is not None:
        if name not in CONFIGS:
            raise ValueError(f'dataset {name!r} takes no path; path-based datasets: '
                             f'{sorted(CONFIGS)}')
        kwargs['config'] = CONFIGS[name](name=config or 'default', path=path)
    elif config is not None:
        kwargs['config'] = config
    builder = BUILDERS[name](**kwargs)
    if path is not None and builder.is_prepared():
        recorded = dict(builder.info.metadata or {}).get('source')
        current = builders.source_fingerprint(path)
        if recorded != current:
            logging.warning('%s/%s in %s was prepared from %s; its source is now %s (%d files, '
                            'fingerprint %s...): preparing it again', name, kwargs['config'].name,
                            data_dir, _describe(recorded), current['path'], current['files'],
                            current['fingerprint'][:12])
            shutil.rmtree(builder.data_dir)
            builder = BUILDERS[name](**kwargs)
    builder.download_and_prepare(file_format='array_record')
    report_skipped(builder)
    return builder


def require_prepared(name: str, data_dir: str | pathlib.Path | None = None,
                     config: str | None = None, path: str | None = None) -> None:
    """For multi-host runs, which never prepare a path-based dataset (CC12M takes hours in one
    process, while every other host would wait): ValueError naming the dataset, the data_dir
    and the command that prepares it, unless it is already prepared there."""
    data_dir = str(data_dir or default_data_dir())
    config = config or 'default'
    builder = BUILDERS[name](data_dir=data_dir, config=CONFIGS[name](name=config, path=path))
    if not builder.is_prepared():
        raise ValueError(
            f'dataset {name}/{config} is not prepared in data_dir {data_dir} '
            '(config.data.data_dir), and a multi-host run does not prepare data: one host '
            'would work for hours while the others wait. Prepare it once, on one machine, into '
            'a data_dir every host reads (gs:// on a pod): python -m psd_jax.data.datasets '
            f'{name} --path {path} --config {config} --data_dir {data_dir}; then train with '
            f'--config.data.data_dir={data_dir}')


def _describe(source: dict | None) -> str:
    if not source:
        return 'an unrecorded source'
    return (f"{source['path']} ({source['files']} files, fingerprint "
            f"{source['fingerprint'][:12]}...)")


def report_skipped(builder: tfds.core.DatasetBuilder) -> None:
    """One warning per split that lost records at preparation: the counts and the first
    shards or records involved (stored in the dataset's metadata)."""
    for split, counts in (dict(builder.info.metadata or {}).get('skipped') or {}).items():
        lost = {k: v for k, v in counts.items() if k != 'shards' and v}
        if lost:
            logging.warning('%s split %r: skipped at preparation %s; e.g. %s', builder.name,
                            split, lost, counts.get('shards', [])[:5])


def data_source(name: str, split: str, data_dir: str | pathlib.Path | None = None) -> Any:
    """A random-access source of a prepared dataset (`name` may be 'builder/config').

    Raises ValueError naming the split and the splits that exist, FileNotFoundError naming the
    directory when the dataset was never prepared there.
    """
    data_dir = str(data_dir or default_data_dir())
    base = name.split('/')[0]
    if base in BUILDERS:  # make sure the project's builders are registered
        _ = BUILDERS[base]
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f'dataset {name!r} is not known to tfds: {e}') from e
    if not builder.is_prepared():
        raise FileNotFoundError(f'dataset {name!r} is not prepared in {data_dir}: run '
                                f'`python -m psd_jax.data.datasets {base}` (or prepare it with '
                                'its tfds builder, file_format="array_record")')
    splits = sorted(builder.info.splits.keys())
    if split.split('[')[0] not in splits:
        raise ValueError(f'split {split!r} does not exist in {name!r}; available: {splits}')
    decoders = None
    if 'image' in builder.info.features:  # the input pipeline decodes: the source's own mode
        decoders = {'image': tfds.decode.SkipDecoding()}  # (alpha, palette) reaches the
    return tfds.data_source(name, split=split, data_dir=data_dir,  # eval transform
                            decoders=decoders)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description='Prepare datasets into the cache (or --data_dir) as ArrayRecord.')
    parser.add_argument('names', nargs='*', default=['emoji'], help=f'of {sorted(BUILDERS)}')
    parser.add_argument('--path', help='your files, for the path-based datasets '
                        f'{sorted(CONFIGS)}')
    parser.add_argument('--config', help="the builder config's name (the path-based datasets: "
                        "a name for your data, used as --config.data.builder_config)")
    parser.add_argument('--data_dir', help='where prepared data goes (default: the cache)')
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            builder = prepare(name, args.data_dir, args.config, args.path)
        except (ValueError, FileNotFoundError) as e:
            parser.exit(2, f'error: {e}\n')
        splits = {k: v.num_examples for k, v in builder.info.splits.items()}
        print(f'{name}: {splits} in {builder.data_dir}')


if __name__ == '__main__':
    main()
