"""Class names and prompt templates of the project's own sets (written for this project).

`class_names(dataset)` and `templates(dataset)` give the lists the zero-shot evaluator embeds
for emoji, emoji_styles and Fashion-MNIST: each class name is put into every template and the
text embeddings are averaged per class. The field's benchmarks (ImageNet, CIFAR, ...) use the
names and templates of open_clip and CLIP_benchmark instead (psd_jax/evaluation/prompts.py).
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
    'fashion_mnist_local': ('a photo of a {}.', 'a grey photo of a {}.',
                            'a low resolution photo of a {}.', 'a product photo of a {}.'),
    'emoji': ('an emoji of a {}.', 'a {} emoji.', 'an icon of a {}.', 'a cartoon {}.'),
    'emoji_styles': ('an emoji of a {}.', 'a {} emoji.', 'an icon of a {}.', 'a cartoon {}.'),
}

CLASS_NAMES = {
    'fashion_mnist_local': FASHION_MNIST,
    'emoji': tuple(EMOJI_GROUPS.values()),
    'emoji_styles': tuple(EMOJI_GROUPS.values()),
}


def class_names(dataset: str) -> tuple[str, ...]:
    """Readable class names, in label order, for a dataset the project knows."""
    name = dataset.split('/')[0].split(':')[0]
    if name not in CLASS_NAMES:
        raise ValueError(f'no class names are kept for dataset {dataset!r}; known: '
                         f'{sorted(CLASS_NAMES)} (the field\'s sets take theirs from '
                         'psd_jax/evaluation/prompts.py; an image_folder_classification set '
                         'from its folder names)')
    return CLASS_NAMES[name]


def templates(dataset: str | None = None) -> tuple[str, ...]:
    """The dataset's prompt templates, or the generic set."""
    name = (dataset or '').split('/')[0].split(':')[0]
    return TEMPLATES.get(name, GENERIC_TEMPLATES)
