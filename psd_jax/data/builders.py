"""tfds builders for users' own data: img2dataset/webdataset shards and class-folder trees.

Both are prepared to ArrayRecord without TensorFlow (every image decoded once to check it,
optionally resized; psd_jax/data/shards.py does the per-shard work), in one process or as an
Apache Beam pipeline (a config's `beam`; datasets.prepare chooses), and read back with
`tfds.data_source`:

    builder = ImageTextShards(config=ImageTextShardsConfig(name='cc3m', path='/data/cc3m'),
                              data_dir='/data/tfds')
    builder.download_and_prepare(file_format='array_record')
    source = tfds.data_source('image_text_shards/cc3m', split='train', data_dir='/data/tfds')
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable

import tensorflow_datasets as tfds

from psd_jax.data.shards import (IMAGE_SUFFIXES, as_path, folder_images, iterate, shard_pairs,
                                 shards_in)

BEAM_NAMESPACE = 'psd_jax.skipped'


def _require_dir(path: str | None, what: str):
    if not path:
        raise ValueError(f'{what}: no data path given (set the builder config\'s `path`)')
    p = as_path(path)
    if not p.is_dir():
        raise FileNotFoundError(f'{what}: data directory {p} does not exist')
    return p


class PreparationConfig(tfds.core.BuilderConfig):
    """`path`: the user's files. `resize_shorter` > 0: images whose shorter side is longer are
    resized to it at preparation (shards.checked_image). `beam`: prepare as an Apache Beam
    pipeline (one tar shard or class folder per element; the runner comes from tfds's
    DownloadConfig, see datasets.prepare), else in this process."""

    def __init__(self, *, path: str | None = None, resize_shorter: int = 0,
                 beam: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.path = path
        self.resize_shorter = int(resize_shorter)
        self.beam = beam


class ImageTextShardsConfig(PreparationConfig):
    """`path`: a directory of img2dataset/webdataset tar shards (optionally `train/`, `val/`
    sub-directories, else everything is `train`)."""


def _beam_units(label: str, units: list[str], produce: Callable) -> Any:
    """A Beam PTransform: `units` (shard or folder names) spread over the workers, each turned
    into its examples by `produce(unit)`, the skip counts kept as Beam counters
    ('<label>/<reason>' in BEAM_NAMESPACE) and read back by _skipped_from_counters."""
    import apache_beam as beam

    def examples(unit: str):
        found, counts, notes = produce(unit)
        for reason, count in counts.items():
            if count:
                beam.metrics.Metrics.counter(BEAM_NAMESPACE, f'{label}/{reason}').inc(count)
        if notes and hasattr(beam.metrics.Metrics, 'string_set'):
            names = beam.metrics.Metrics.string_set(BEAM_NAMESPACE, f'{label}/notes')
            for note in notes[:20]:
                names.add(note)
        yield from found

    return (f'{label}: units' >> beam.Create(units) | f'{label}: spread' >> beam.Reshuffle()
            | f'{label}: examples' >> beam.FlatMap(examples))


def _skipped_from_counters(pipeline_result, skipped: dict) -> None:
    """Fill skipped[split] from the Beam counters _beam_units kept."""
    from apache_beam.metrics.metric import MetricsFilter
    metrics = pipeline_result.metrics().query(MetricsFilter().with_namespace(BEAM_NAMESPACE))
    for result in metrics.get('counters', []):
        split, _, reason = result.key.metric.name.partition('/')
        if split in skipped:
            skipped[split][reason] = skipped[split].get(reason, 0) + int(result.committed or 0)
    for result in metrics.get('string_sets', []):
        split, _, _ = result.key.metric.name.partition('/')
        if split in skipped:
            skipped[split]['shards'] = sorted(result.committed or ())[:20]


class ImageTextShards(tfds.core.GeneratorBasedBuilder):
    """Image-caption pairs from tar shards holding KEY.jpg|png, KEY.txt and optional KEY.json
    (the format CC3M / CC12M / YFCC subsets are downloaded in). Pairs whose image does not decode
    or whose caption is missing or empty are skipped; the counts are stored in the dataset's
    metadata (`builder.info.metadata['skipped']`)."""

    VERSION = tfds.core.Version('1.1.0')
    RELEASE_NOTES = {'1.0.0': 'First version.',
                     '1.1.0': 'Images stored as their source bytes, mode kept (alpha, palette).'}
    BUILDER_CONFIGS = [ImageTextShardsConfig(name='default')]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, None)),  # source mode kept
                'caption': tfds.features.Text(),
                'key': tfds.features.Text(),
                'json': tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        root = _require_dir(self.builder_config.path, 'image_text_shards')
        subdirs = [d for d in ('train', 'validation', 'val', 'test') if (root / d).is_dir()]
        splits = {('validation' if d == 'val' else d): root / d for d in subdirs} or {
            'train': root}
        for split, folder in splits.items():
            if not sorted(folder.glob('*.tar')):
                raise FileNotFoundError(f'image_text_shards: no .tar shards in {folder} '
                                        f'(split {split!r})')
        self.info.metadata['skipped'] = {}
        self.info.metadata['source'] = source_fingerprint(str(root))
        self.info.metadata['preparation'] = preparation(self.builder_config)
        return {split: self._generate_examples(split, folder) for split, folder in splits.items()}

    def _generate_examples(self, split: str, folder):
        skipped = dict.fromkeys(('undecodable_image', 'missing_caption', 'missing_image',
                                 'too_small_image', 'unreadable_shard', 'truncated_shard',
                                 'caption_not_utf8'), 0)
        skipped['shards'] = []
        self.info.metadata['skipped'][split] = skipped
        produce = functools.partial(shard_pairs,
                                    resize_shorter=self.builder_config.resize_shorter)
        shards = shards_in(folder)
        if self.builder_config.beam:
            return _beam_units(split, [str(p) for p in shards], produce)
        return self._checked(split, folder, iterate(shards, produce, skipped), skipped)

    @staticmethod
    def _checked(split, folder, examples, skipped):
        kept = 0
        for example in examples:
            kept += 1
            yield example
        if not kept:
            counts = {k: v for k, v in skipped.items() if k != 'shards' and v}
            raise ValueError(f'image_text_shards: {folder} (split {split!r}) has no usable '
                             f'image-caption pair; skipped {counts}: {skipped["shards"][:5]}')

    def _process_pipeline_result(self, pipeline_result) -> None:
        _skipped_from_counters(pipeline_result, self.info.metadata['skipped'])


def preparation(config: PreparationConfig) -> dict:
    """What, besides the source files, decides the prepared records (stored in the dataset's
    metadata; a change prepares the data again)."""
    return {'resize_shorter': config.resize_shorter}


def source_fingerprint(path: str) -> dict:
    """{'path', 'files', 'fingerprint'} of a path-based dataset's source: every file's name,
    size and modification time, hashed, so that a re-pointed path or changed shards are
    noticed and the dataset prepared again."""
    import hashlib
    digest = hashlib.sha256()
    count = 0
    if '://' in str(path):  # remote: names and sizes (modification times are coarse there)
        root = as_path(path)
        for file in sorted((p for p in root.rglob('*') if p.is_file()), key=str):
            digest.update(f'{file.relative_to(root)}\0{file.stat().length}\n'.encode())
            count += 1
        return {'path': str(root), 'files': count, 'fingerprint': digest.hexdigest()}
    root = pathlib.Path(path).expanduser().resolve()
    for file in sorted(p for p in root.rglob('*') if p.is_file()):
        stat = file.stat()
        digest.update(f'{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n'
                      .encode())
        count += 1
    return {'path': str(root), 'files': count, 'fingerprint': digest.hexdigest()}


def source_size(path: str) -> int:
    """Bytes of the images and shards under `path` (decides how it is prepared)."""
    root = as_path(path)
    files = [p for p in root.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES + ('.tar',)]
    return sum(p.stat().st_size if isinstance(p, pathlib.Path) else p.stat().length
               for p in files)


def expected_splits(path: str) -> list[str]:
    """The split names a path-based dataset at `path` will have (its train/, val/ ->
    validation, test/ sub-folders, else one 'train' split), known before preparing it."""
    root = as_path(path)
    found = [('validation' if d == 'val' else d) for d in ('train', 'validation', 'val', 'test')
             if (root / d).is_dir()]
    return found or ['train']


class ImageFolderConfig(PreparationConfig):
    """`path`: a folder of class sub-folders, or of split folders (train/, test/, ...) each
    holding class sub-folders."""


class ImageFolderClassification(tfds.core.GeneratorBasedBuilder):
    """Labelled images from class sub-folders, for zero-shot and linear-probe sets of one's own.
    Class names are the folder names (underscores read as spaces in `caption`)."""

    VERSION = tfds.core.Version('1.1.0')
    RELEASE_NOTES = {'1.0.0': 'First version.',
                     '1.1.0': 'Images stored as their source bytes, mode kept (alpha, palette).'}
    BUILDER_CONFIGS = [ImageFolderConfig(name='default')]

    def _layout(self) -> tuple[dict[str, Any], list[str]]:
        root = _require_dir(self.builder_config.path, 'image_folder_classification')
        split_dirs = [d for d in ('train', 'validation', 'val', 'test') if (root / d).is_dir()]
        splits = ({('validation' if d == 'val' else d): root / d for d in split_dirs}
                  or {'train': root})
        classes = sorted({c.name for folder in splits.values() for c in folder.iterdir()
                          if c.is_dir()})
        if not classes:
            raise FileNotFoundError(f'image_folder_classification: no class sub-folders in '
                                    f'{list(map(str, splits.values()))}')
        return splits, classes

    def _info(self) -> tfds.core.DatasetInfo:
        try:
            _, classes = self._layout()
        except (ValueError, FileNotFoundError):
            classes = None  # reading a prepared dataset: names come from its stored info
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, None)),  # source mode kept
                'label': tfds.features.ClassLabel(names=classes) if classes else
                tfds.features.ClassLabel(num_classes=1),
                'caption': tfds.features.Text(),
                'key': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'), metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        splits, classes = self._layout()
        self.info.metadata['skipped'] = {}
        self.info.metadata['source'] = source_fingerprint(self.builder_config.path)
        self.info.metadata['preparation'] = preparation(self.builder_config)
        return {split: self._generate_examples(split, folder, classes)
                for split, folder in splits.items()}

    def _generate_examples(self, split: str, folder, classes: list[str]):
        skipped = {'undecodable_image': 0, 'shards': []}
        self.info.metadata['skipped'][split] = skipped
        produce = functools.partial(folder_images, split, str(folder),
                                    resize_shorter=self.builder_config.resize_shorter)
        if self.builder_config.beam:
            return _beam_units(split, list(classes), produce)
        return iterate(classes, produce, skipped)

    def _process_pipeline_result(self, pipeline_result) -> None:
        _skipped_from_counters(pipeline_result, self.info.metadata['skipped'])
