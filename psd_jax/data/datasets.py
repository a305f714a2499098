"""The project's datasets by name: prepare them (once) to ArrayRecord and open data sources.

    python -m psd_jax.data.datasets emoji emoji_styles fashion_mnist_local   # into the cache
    python -m psd_jax.data.datasets image_text_shards --path /data/mine --config mine

Prepared data lives in `<data_dir>` (default `$PSD_JAX_CACHE/tfds`). Reading goes through
`tfds.data_source`, which needs no TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
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
DISTRIBUTABLE = ('image_text_shards', 'image_folder_classification')
CONFIGS = {
    'fashion_mnist_local': FashionMnistConfig,
    'image_text_shards': builders.ImageTextShardsConfig,
    'image_folder_classification': builders.ImageFolderConfig,
}


def default_data_dir() -> pathlib.Path:
    return fetch.cache_dir() / 'tfds'


# A source at least this large is prepared on this machine's cores (Beam's local runner) when
# workers are not given, apache-beam is installed and the machine has BEAM_MIN_CORES cores;
# otherwise in this process. (On 2 cores one process prepares 1,603 images/s and Beam's 2
# workers 818: benchmarks/results/prepare_throughput.json.)
LARGE_SOURCE_BYTES = 2 * 2 ** 30
BEAM_MIN_CORES = 8


@dataclasses.dataclass(frozen=True)
class Preparation:
    """How a path-based dataset is prepared. `workers`: 0 in this process; N > 0 as an Apache
    Beam pipeline on N local worker processes (DirectRunner, multi_processing); -1 (default):
    N = the machine's cores for a source of LARGE_SOURCE_BYTES or more on a machine of
    BEAM_MIN_CORES cores or more, else 0.
    `beam_runner` (e.g. DataflowRunner, SparkRunner, FlinkRunner) with `beam_options` (Beam's
    own command-line options, e.g. --project=P --region=R --temp_location=gs://...) runs it on
    a cluster instead. `resize_shorter` > 0 resizes images to that shorter side."""
    workers: int = -1
    beam_runner: str = ''
    beam_options: tuple[str, ...] = ()
    resize_shorter: int = 0

    def workers_for(self, path: str) -> int:
        """The worker processes for a source at `path` (0: no Beam)."""
        if self.beam_runner or self.workers >= 0:
            return max(self.workers, 0)
        cores = os.cpu_count() or 1
        if cores < BEAM_MIN_CORES:
            return 0
        size = builders.source_size(path)
        if size < LARGE_SOURCE_BYTES:
            return 0
        if importlib.util.find_spec('apache_beam') is None:
            logging.warning('%s holds %.1f GiB: install apache-beam (pip install -e \'.[beam]\') '
                            'to prepare it on all %d cores', path, size / 2 ** 30,
                            os.cpu_count() or 1)
            return 0
        return os.cpu_count() or 1

    def download_config(self, path: str) -> tuple[bool, Any]:
        """(whether Beam is used, tfds's DownloadConfig for it)."""
        workers = self.workers_for(path)
        if not (workers or self.beam_runner):
            return False, None
        try:
            import apache_beam as beam
        except ImportError as e:
            raise ValueError('preparing with workers or a beam_runner needs apache-beam: pip '
                             "install -e '.[beam]'") from e
        args, runner = list(self.beam_options), None
        if self.beam_runner:
            args.append(f'--runner={self.beam_runner}')
        else:  # the DirectRunner's multi-process engine, named (the DirectRunner itself may
            # first try to download the Prism runner)
            from apache_beam.runners.portability.fn_api_runner import FnApiRunner
            runner = FnApiRunner()
            args += [f'--direct_num_workers={workers}', '--direct_running_mode=multi_processing']
        logging.info('preparing %s with Apache Beam (%s): %s', path,
                     self.beam_runner or f'{workers} local worker processes', ' '.join(args))
        options = beam.options.pipeline_options.PipelineOptions(args)
        return True, tfds.download.DownloadConfig(beam_options=options, beam_runner=runner)


def prepare(name: str, data_dir: str | pathlib.Path | None = None, config: str | None = None,
            path: str | None = None, how: Preparation = Preparation()
            ) -> tfds.core.DatasetBuilder:
    """Build dataset `name` to ArrayRecord unless already prepared; returns its builder.

    `config` picks a named builder config (emoji: 'label' or 'label_keywords'); `path` points
    the path-based builders (image_text_shards, image_folder_classification,
    fashion_mnist_local) at the user's files, under the config name `config` (default
    'default'); `how` says whether they are prepared in this process or with Apache Beam
    (image_text_shards and image_folder_classification), and the resize. The records are the
    same whichever way.
    """
    if name not in BUILDERS:
        raise ValueError(f'dataset {name!r} is not known; allowed: {sorted(BUILDERS)} (tfds '
                         'catalog sets are prepared with their own builders)')
    data_dir = str(data_dir or default_data_dir())
    kwargs: dict[str, Any] = {'data_dir': data_dir}
    download_config = None
    if path is not None:
        if name not in CONFIGS:
            raise ValueError(f'dataset {name!r} takes no path; path-based datasets: '
                             f'{sorted(CONFIGS)}')
        extra = {}
        if name in DISTRIBUTABLE:
            beam, download_config = how.download_config(path)
            extra = {'resize_shorter': how.resize_shorter, 'beam': beam}
        elif how.resize_shorter or how.beam_runner or how.workers > 0:
            raise ValueError(f'dataset {name!r} is prepared in one process without resizing; '
                             f'workers, beam_runner and resize_shorter apply to '
                             f'{sorted(DISTRIBUTABLE)}')
        kwargs['config'] = CONFIGS[name](name=config or 'default', path=path, **extra)
    elif config is not None:
        kwargs['config'] = config
    builder = BUILDERS[name](**kwargs)
    if path is not None and builder.is_prepared():
        metadata = dict(builder.info.metadata or {})
        recorded, current = metadata.get('source'), builders.source_fingerprint(path)
        wanted = builders.preparation(kwargs['config']) if name in DISTRIBUTABLE else None
        if recorded != current:
            logging.warning('%s/%s in %s was prepared from %s; its source is now %s (%d files, '
                            'fingerprint %s...): preparing it again', name, kwargs['config'].name,
                            data_dir, _describe(recorded), current['path'], current['files'],
                            current['fingerprint'][:12])
        elif wanted is not None and metadata.get('preparation', {'resize_shorter': 0}) != wanted:
            logging.warning('%s/%s in %s was prepared with %s; now asked for %s: preparing it '
                            'again', name, kwargs['config'].name, data_dir,
                            metadata.get('preparation'), wanted)
        else:
            recorded = None
        if recorded is not None or (wanted is not None and metadata.get(
                'preparation', {'resize_shorter': 0}) != wanted):
            shutil.rmtree(builder.data_dir)
            builder = BUILDERS[name](**kwargs)
    builder.download_and_prepare(file_format='array_record', download_config=download_config)
    report_skipped(builder)
    return builder


def content_fingerprint(source) -> tuple[int, str]:
    """(records, an order-independent digest of their contents) of a data source: two
    preparations of the same data, by any runner, give the same pair."""
    import hashlib
    total = 0
    for record in (source[i] for i in range(len(source))):
        digest = hashlib.sha256()
        for key in sorted(record):
            value = record[key]
            digest.update(key.encode() + b'\0' + (value if isinstance(value, bytes)
                                                    else str(value).encode()) + b'\0')
        total = (total + int.from_bytes(digest.digest(), 'big')) % 2 ** 256
    return len(source), f'{total:064x}'


def identity(source) -> dict:
    """What identifies the prepared records a data source reads, saved with every checkpoint
    so that a resume can tell when the data changed under it: the dataset (builder/config/
    version), split, record count, shard lengths and bytes, and for the user's own data the
    fingerprint of its source files and how it was prepared. A wrapper (caption noise) is
    looked through; a source that is not a tfds one gives its length alone."""
    while not hasattr(source, 'dataset_info') and hasattr(source, 'source'):
        source = source.source
    info = getattr(source, 'dataset_info', None)
    if info is None:
        return {'records': len(source)}
    split = str(getattr(source, 'split', ''))
    stored = info.splits[split.split('[')[0]] if split.split('[')[0] in info.splits else None
    metadata = dict(info.metadata or {})
    return {'dataset': info.full_name, 'split': split, 'records': len(source),
            'shard_lengths': [int(n) for n in stored.shard_lengths] if stored else [],
            'bytes': int(stored.num_bytes) if stored else 0,
            'source': metadata.get('source'), 'preparation': metadata.get('preparation')}


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
    parser.add_argument('--workers', type=int, default=-1,
                        help='Apache Beam worker processes on this machine (0: prepare in this '
                        'process; default: all cores for a source of 2 GiB or more on a machine '
                        'of 8 cores or more)')
    parser.add_argument('--beam_runner', default='',
                        help='run the preparation on a cluster: DataflowRunner, SparkRunner, '
                        'FlinkRunner (with --beam_options)')
    parser.add_argument('--beam_options', default='',
                        help='Beam\'s own options for the runner, e.g. "--project=P '
                        '--region=R --temp_location=gs://bucket/tmp"')
    parser.add_argument('--resize_shorter', type=int, default=0,
                        help='resize images whose shorter side is longer to this many pixels')
    args = parser.parse_args(argv)
    import logging as python_logging
    python_logging.getLogger('apache_beam').setLevel(python_logging.ERROR)  # its workers' chatter
    how = Preparation(args.workers, args.beam_runner, tuple(args.beam_options.split()),
                      args.resize_shorter)
    for name in args.names:
        try:
            builder = prepare(name, args.data_dir, args.config, args.path, how)
        except (ValueError, FileNotFoundError) as e:
            parser.exit(2, f'error: {e}\n')
        splits = {k: v.num_examples for k, v in builder.info.splits.items()}
        print(f'{name}: {splits} in {builder.data_dir}')


if __name__ == '__main__':
    main()
