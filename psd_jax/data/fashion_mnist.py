"""The `fashion_mnist_local` tfds builder: Fashion-MNIST from local IDX files.

Default path: `/usr/share/datasets/fashion-mnist/` (Debian package `dataset-fashion-mnist`).
60,000 train / 10,000 test 28 x 28 grey images in 10 classes; each example also carries a
templated caption ("a photo of a {class}.") so the set can train and test dual encoders.
"""

from __future__ import annotations

import gzip
import io
import pathlib
import struct

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

DEFAULT_PATH = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = ('t-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
               'sneaker', 'bag', 'ankle boot')
CAPTION_TEMPLATE = 'a photo of a {}.'
SPLITS = {'train': 'train', 'test': 't10k'}


def read_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array: (N,) labels or (N, rows, cols)."""
    if not path.is_file():
        raise FileNotFoundError(f'fashion_mnist_local: {path} not found (expected the IDX files '
                                f'of the Debian package dataset-fashion-mnist)')
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()
    magic, count = struct.unpack('>II', data[:8])
    dims = magic & 0xFF
    if magic >> 8 != 0x08 or dims not in (1, 3):
        raise ValueError(f'{path} is not an unsigned-byte IDX file (magic {magic:#x})')
    shape = (count,) + struct.unpack('>' + 'I' * (dims - 1), data[8:8 + 4 * (dims - 1)])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f'{path} holds {body.size} bytes of data, its header says {shape}')
    return body.reshape(shape)


class FashionMnistConfig(tfds.core.BuilderConfig):
    def __init__(self, *, path: str = DEFAULT_PATH, **kwargs):
        super().__init__(**kwargs)
        self.path = path


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST with class names and templated captions, from local IDX files."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First version.'}
    BUILDER_CONFIGS = [FashionMnistConfig(name='default')]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(28, 28, 1), encoding_format='png'),
                'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                'caption': tfds.features.Text(),
                'key': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://github.com/zalandoresearch/fashion-mnist')

    def _split_generators(self, dl_manager):
        del dl_manager
        root = pathlib.Path(self.builder_config.path)
        arrays = {}
        for split, prefix in SPLITS.items():
            images = read_idx(root / f'{prefix}-images-idx3-ubyte.gz')
            labels = read_idx(root / f'{prefix}-labels-idx1-ubyte.gz')
            if len(images) != len(labels):
                raise ValueError(f'{root}: {len(images)} {prefix} images but {len(labels)} '
                                 'labels')
            arrays[split] = (images, labels)
        return {split: self._generate_examples(*arrays[split]) for split in SPLITS}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels)):
            png = io.BytesIO()
            Image.fromarray(image, mode='L').save(png, format='PNG')
            yield i, {'image': io.BytesIO(png.getvalue()), 'label': int(label),
                      'caption': CAPTION_TEMPLATE.format(CLASS_NAMES[label]), 'key': str(i)}
