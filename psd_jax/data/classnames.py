"""Class names and prompt templates for zero-shot classification (written for this project).

`class_names(dataset)` and `templates(dataset)` return the lists the zero-shot evaluator embeds:
each class name is put into every template and the text embeddings are averaged per class.
"""

from __future__ import annotations

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

TEMPLATES = {
    'cifar10': ('a photo of a {}.', 'a blurry photo of a {}.', 'a low resolution photo of a {}.',
                'a pixelated photo of the {}.', 'a photo of the small {}.'),
    'cifar100': ('a photo of a {}.', 'a blurry photo of a {}.', 'a low resolution photo of a {}.',
                 'a pixelated photo of the {}.', 'a photo of the small {}.'),
    'fashion_mnist_local': ('a photo of a {}.', 'a grey photo of a {}.',
                            'a low resolution photo of a {}.', 'a product photo of a {}.'),
    'emoji': ('an emoji of a {}.', 'a {} emoji.', 'an icon of a {}.', 'a cartoon {}.'),
}

CLASS_NAMES = {
    'cifar10': CIFAR10,
    'cifar100': CIFAR100,
    'fashion_mnist_local': FASHION_MNIST,
    'emoji': tuple(EMOJI_GROUPS.values()),
}


def class_names(dataset: str) -> tuple[str, ...]:
    """Readable class names, in label order, for a dataset the project knows."""
    name = dataset.split('/')[0].split(':')[0]
    if name not in CLASS_NAMES:
        raise ValueError(f'no class names are kept for dataset {dataset!r}; known: '
                         f'{sorted(CLASS_NAMES)} (pass class names explicitly for others)')
    return CLASS_NAMES[name]


def templates(dataset: str | None = None) -> tuple[str, ...]:
    """The dataset's prompt templates, or the generic set."""
    name = (dataset or '').split('/')[0].split(':')[0]
    return TEMPLATES.get(name, GENERIC_TEMPLATES)
