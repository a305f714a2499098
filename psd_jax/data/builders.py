"""tfds builders for users' own data: img2dataset/webdataset shards and class-folder trees.

Both are prepared to ArrayRecord without TensorFlow (images are checked and, if needed,
re-encoded with PIL) and read back with `tfds.data_source`:

    builder = ImageTextShards(config=ImageTextShardsConfig(name='cc3m', path='/data/cc3m'),
                              data_dir='/data/tfds')
    builder.download_and_prepare(file_format='array_record')
    source = tfds.data_source('image_text_shards/cc3m', split='train', data_dir='/data/tfds')
"""

from __future__ import annotations

import io
import pathlib
import tarfile
from typing import Iterator

import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')


def checked_image(data: bytes) -> io.BytesIO | None:
    """The image's own bytes, or None when they do not decode fully.

    Every image is stored as it came (its mode kept: alpha, palette, grey, CMYK), because
    open_clip's evaluation transform resizes and crops in the image's own mode and converts to
    RGB last (psd_jax/data/transforms.py); the input pipeline decodes the bytes itself. Read
    the prepared data with `datasets.data_source` (which skips tfds's decoding; tfds's own
    decoder cannot give one channel count to images of several modes).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes the whole image: truncated files fail here
            return io.BytesIO(data)
    except Exception:  # PIL raises many types for corrupt data  # noqa: BLE001
        return None


def _require_dir(path: str | None, what: str) -> pathlib.Path:
    if not path:
        raise ValueError(f'{what}: no data path given (set the builder config\'s `path`)')
    p = pathlib.Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f'{what}: data directory {p} does not exist')
    return p


class ImageTextShardsConfig(tfds.core.BuilderConfig):
    """`path`: a directory of img2dataset/webdataset tar shards (optionally `train/`, `val/`
    sub-directories, else everything is `train`)."""

    def __init__(self, *, path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = path


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
        return {split: self._generate_examples(split, folder) for split, folder in splits.items()}

    def _generate_examples(self, split: str, folder: pathlib.Path) -> Iterator:
        skipped = {'undecodable_image': 0, 'missing_caption': 0, 'missing_image': 0,
                   'unreadable_shard': 0, 'truncated_shard': 0, 'shards': []}
        self.info.metadata['skipped'][split] = skipped
        kept = 0
        for shard in sorted(folder.glob('*.tar')):
            groups, damage = _read_shard(shard)
            if damage:
                skipped['unreadable_shard' if not groups else 'truncated_shard'] += 1
                skipped['shards'].append(f'{shard.name}: {damage}')
            for key, files in groups.items():
                image = next((files[s] for s in IMAGE_SUFFIXES if s in files), None)
                caption = files.get('.txt', b'').decode('utf-8', 'replace').strip()
                reason = ('missing_image' if image is None else 'missing_caption'
                          if not caption else None)
                checked = checked_image(image) if reason is None else None
                if reason is None and checked is None:
                    reason = 'undecodable_image'
                if reason is not None:
                    skipped[reason] += 1
                    if len(skipped['shards']) < 20:
                        skipped['shards'].append(f'{shard.name}/{key}: {reason}')
                    continue
                meta = files.get('.json', b'{}').decode('utf-8', 'replace')
                uid = f'{shard.stem}/{key}'
                kept += 1
                yield uid, {'image': checked, 'caption': caption, 'key': uid, 'json': meta}
        if not kept:
            counts = {k: v for k, v in skipped.items() if k != 'shards' and v}
            raise ValueError(f'image_text_shards: {folder} (split {split!r}) has no usable '
                             f'image-caption pair; skipped {counts}: {skipped["shards"][:5]}')


def _read_shard(shard: pathlib.Path) -> tuple[dict[str, dict[str, bytes]], str]:
    """({key: {suffix: bytes}}, damage) of one tar shard (webdataset: files grouped by their
    stem). A shard damaged part-way (truncated, overwritten) keeps every file read whole before
    the damage (a pair missing its image or caption is then skipped as such), and `damage`
    says what failed ('' for an intact shard)."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base = name.rsplit('/', 1)[-1]
                if '.' not in base:
                    continue
                stem, suffix = base.split('.', 1)
                key = name[:len(name) - len(base)] + stem
                groups.setdefault(key, {})['.' + suffix.lower()] = tar.extractfile(
                    member).read()
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as e:  # members read so far are whole
        return groups, f'{type(e).__name__}: {e}'
    with open(shard, 'rb') as f:  # a cut at a member boundary reads as a shorter archive:
        f.seek(end)               # an intact one ends with at least two zero blocks
        rest = f.read()
    if len(rest) < 2 * tarfile.BLOCKSIZE or rest.strip(b'\0'):
        return groups, f'truncated or damaged after byte {end}: no end-of-archive marker'
    return groups, ''


def source_fingerprint(path: str) -> dict:
    """{'path', 'files', 'fingerprint'} of a path-based dataset's source: every file's name,
    size and modification time, hashed, so that a re-pointed path or changed shards are
    noticed and the dataset prepared again."""
    import hashlib
    root = pathlib.Path(path).expanduser().resolve()
    digest = hashlib.sha256()
    count = 0
    for file in sorted(p for p in root.rglob('*') if p.is_file()):
        stat = file.stat()
        digest.update(f'{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n'
                      .encode())
        count += 1
    return {'path': str(root), 'files': count, 'fingerprint': digest.hexdigest()}


def expected_splits(path: str) -> list[str]:
    """The split names a path-based dataset at `path` will have (its train/, val/ ->
    validation, test/ sub-folders, else one 'train' split), known before preparing it."""
    root = pathlib.Path(path).expanduser()
    found = [('validation' if d == 'val' else d) for d in ('train', 'validation', 'val', 'test')
             if (root / d).is_dir()]
    return found or ['train']


class ImageFolderConfig(tfds.core.BuilderConfig):
    """`path`: a folder of class sub-folders, or of split folders (train/, test/, ...) each
    holding class sub-folders."""

    def __init__(self, *, path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = path


class ImageFolderClassification(tfds.core.GeneratorBasedBuilder):
    """Labelled images from class sub-folders, for zero-shot and linear-probe sets of one's own.
    Class names are the folder names (underscores read as spaces in `caption`)."""

    VERSION = tfds.core.Version('1.1.0')
    RELEASE_NOTES = {'1.0.0': 'First version.',
                     '1.1.0': 'Images stored as their source bytes, mode kept (alpha, palette).'}
    BUILDER_CONFIGS = [ImageFolderConfig(name='default')]

    def _layout(self) -> tuple[dict[str, pathlib.Path], list[str]]:
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
        return {split: self._generate_examples(split, folder, classes)
                for split, folder in splits.items()}

    def _generate_examples(self, split: str, folder: pathlib.Path, classes: list[str]):
        skipped = {'undecodable_image': 0}
        self.info.metadata['skipped'][split] = skipped
        for name in classes:
            class_dir = folder / name
            if not class_dir.is_dir():
                continue
            for path in sorted(class_dir.iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                checked = checked_image(path.read_bytes())
                if checked is None:
                    skipped['undecodable_image'] += 1
                    continue
                key = f'{split}/{name}/{path.name}'
                yield key, {'image': checked, 'label': name, 'caption': name.replace('_', ' '),
                            'key': key}
