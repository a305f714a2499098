"""Class names and prompt templates for zero-shot classification (written for this project).

`class_names(dataset)` and `templates(dataset)` return the lists the zero-shot evaluator embeds:
each class name is put into every template and the text embeddings are averaged per class.
"""

from __future__ import annotations

import functools
import importlib.resources

GENERIC_TEMPLATES = (
    'a photo of a {}.',
    'a picture of a {}.',
    'an image of a {}.',
    'a photo of the {}.',
    'a close-up photo of a {}.',
    'a drawing of a {}.',
    'a {}.',
)

CIFAR10 = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
           'truck')

CIFAR100 = (
    'apple', 'aquarium fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle',
    'bottle', 'bowl', 'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle',
    'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch',
    'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish', 'forest', 'fox',
    'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn mower', 'leopard', 'lion',
    'lizard', 'lobster', 'man', 'maple tree', 'motorcycle', 'mountain', 'mouse', 'mushroom',
    'oak tree', 'orange', 'orchid', 'otter', 'palm tree', 'pear', 'pickup truck', 'pine tree',
    'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road',
    'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake',
    'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet pepper', 'table', 'tank',
    'telephone', 'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle',
    'wardrobe', 'whale', 'willow tree', 'wolf', 'woman', 'worm')

FASHION_MNIST = ('t-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                 'sneaker', 'bag', 'ankle boot')

# emojibase group slugs -> readable names (the `label` feature of the emoji dataset)
EMOJI_GROUPS = {
    'activities': 'activity', 'animals-nature': 'animal or plant', 'component': 'component',
    'flags': 'flag', 'food-drink': 'food or drink', 'objects': 'object',
    'people-body': 'person or body part', 'smileys-emotion': 'smiley or emotion',
    'symbols': 'symbol', 'travel-places': 'travel or place',
}

# tfds ImageNet sets that label in the 1,000-class space (imagenet_r and imagenet_a use 200 of
# the classes; their evaluation restricts the logits to the classes present).
IMAGENET_SETS = ('imagenet2012', 'imagenet2012_real', 'imagenet_v2', 'imagenet_sketch',
                 'imagenet_r', 'imagenet_a')

IMAGENET_TEMPLATES = (
    'a photo of a {}.', 'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a rendering of a {}.', 'graffiti of a {}.', 'a cropped photo of the {}.',
    'a tattoo of a {}.', 'a bright photo of a {}.', 'a photo of a clean {}.',
    'a photo of a dirty {}.', 'a dark photo of the {}.', 'a drawing of a {}.',
    'a photo of my {}.', 'a plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a pixelated photo of the {}.', 'a sketch of a {}.', 'a cartoon {}.', 'art of the {}.',
    'a jpeg corrupted photo of a {}.', 'a blurry photo of the {}.', 'a photo of a large {}.',
    'a photo of a small {}.', 'a toy {}.', 'an embroidered {}.', 'a low resolution photo of a {}.',
)


@functools.lru_cache(maxsize=None)
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(WordNet ids, readable names) of ImageNet-1k in tfds label order.

    Made by scripts/make_imagenet_classnames.py from WordNet 3.0 lemmas.
    """
    text = (importlib.resources.files('psd_jax.data') / 'imagenet_classnames.tsv').read_text()
    rows = [line.split('\t') for line in text.splitlines() if line]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


TEMPLATES = {
    'cifar10': ('a photo of a {}.', 'a blurry photo of a {}.', 'a low resolution photo of a {}.',
                'a pixelated photo of the {}.', 'a photo of the small {}.'),
    'cifar100': ('a photo of a {}.', 'a blurry photo of a {}.', 'a low resolution photo of a {}.',
                 'a pixelated photo of the {}.', 'a photo of the small {}.'),
    'fashion_mnist_local': ('a photo of a {}.', 'a grey photo of a {}.',
                            'a low resolution photo of a {}.', 'a product photo of a {}.'),
    'emoji': ('an emoji of a {}.', 'a {} emoji.', 'an icon of a {}.', 'a cartoon {}.'),
    'emoji_styles': ('an emoji of a {}.', 'a {} emoji.', 'an icon of a {}.', 'a cartoon {}.'),
    **{name: IMAGENET_TEMPLATES for name in IMAGENET_SETS},
}

CLASS_NAMES = {
    'cifar10': CIFAR10,
    'cifar100': CIFAR100,
    'fashion_mnist_local': FASHION_MNIST,
    'emoji': tuple(EMOJI_GROUPS.values()),
    'emoji_styles': tuple(EMOJI_GROUPS.values()),
}


def class_names(dataset: str) -> tuple[str, ...]:
    """Readable class names, in label order, for a dataset the project knows."""
    name = dataset.split('/')[0].split(':')[0]
    if name in IMAGENET_SETS:
        return imagenet_classes()[1]
    if name not in CLASS_NAMES:
        raise ValueError(f'no class names are kept for dataset {dataset!r}; known: '
                         f'{sorted(CLASS_NAMES) + list(IMAGENET_SETS)} (pass class names '
                         'explicitly for others)')
    return CLASS_NAMES[name]


def templates(dataset: str | None = None) -> tuple[str, ...]:
    """The dataset's prompt templates, or the generic set."""
    name = (dataset or '').split('/')[0].split(':')[0]
    return TEMPLATES.get(name, GENERIC_TEMPLATES)
