"""The `emoji` tfds builder: the default demo dataset, real artwork with real names.

1,911 emoji, each drawn by two artists (Google Noto and Twitter Twemoji styles, 64 x 64 PNG,
composited on white). Splits are the styles, so training on one and retrieving on the other is
a held-out evaluation. Captions are the emoji's English label (config `label`) or label plus
keywords (config `label_keywords`); the emoji group (9 classes with images) and subgroup give
labels for zero-shot classification. Sources: `psd_jax.data.fetch.emoji_sources()`.
"""

from __future__ import annotations

import io
import json
import pathlib

import tensorflow_datasets as tfds
from PIL import Image

from psd_jax.data import fetch

STYLES = ('google', 'twitter')
IMAGE_SIZE = 64


def png_on_white(png: pathlib.Path) -> io.BytesIO:
    """The emoji composited on white as RGB PNG bytes (encoded with PIL: no TensorFlow)."""
    with Image.open(png) as im:
        im = im.convert('RGBA')
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))
        out = io.BytesIO()
        Image.alpha_composite(white, im).convert('RGB').save(out, format='PNG')
        return io.BytesIO(out.getvalue())


def load_metadata(sources: pathlib.Path) -> tuple[list[dict], list[str], list[str]]:
    """Join emoji-datasource entries with emojibase names; returns (entries, groups, subgroups).

    Each entry: hexcode, image file name, label, keywords, group and subgroup names.
    """
    datasource = json.loads(
        (sources / 'emoji-datasource-google' / 'package' / 'emoji.json').read_text())
    base = json.loads((sources / 'emojibase-data' / 'package' / 'en' / 'data.json').read_text())
    meta = json.loads((sources / 'emojibase-data' / 'package' / 'meta' / 'groups.json')
                      .read_text())
    by_hex = {e['hexcode']: e for e in base}
    entries = []
    for e in datasource:
        info = by_hex.get(e['unified']) or by_hex.get(e.get('non_qualified') or '')
        if info is None or 'group' not in info:
            continue
        entries.append({'hexcode': e['unified'], 'image': e['image'], 'label': info['label'],
                        'keywords': list(info.get('tags', [])),
                        'group': meta['groups'][str(info['group'])],
                        'subgroup': meta['subgroups'][str(info['subgroup'])]})
    groups = sorted({e['group'] for e in entries})
    subgroups = sorted({e['subgroup'] for e in entries})
    return entries, groups, subgroups


def features(groups: list[str], subgroups: list[str]) -> tfds.features.FeaturesDict:
    """The emoji datasets' record: 64 px image, caption, key, group label and subgroup
    (shared by `emoji` and `emoji_styles`; empty names before the sources are readable)."""
    return tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
        'caption': tfds.features.Text(),
        'key': tfds.features.Text(),
        'label': tfds.features.ClassLabel(names=groups or ['unknown']),
        'subgroup': tfds.features.ClassLabel(names=subgroups or ['unknown']),
    })


class EmojiConfig(tfds.core.BuilderConfig):
    def __init__(self, *, keywords: bool, **kwargs):
        super().__init__(**kwargs)
        self.keywords = keywords


class Emoji(tfds.core.GeneratorBasedBuilder):
    """Emoji images in two artists' styles with their English names as captions."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'emoji-datasource 16.0.0 artwork, emojibase-data 17.0.0 names.'}
    BUILDER_CONFIGS = [
        EmojiConfig(name='label', keywords=False, description='caption = the English label'),
        EmojiConfig(name='label_keywords', keywords=True,
                    description='caption = label, then keywords'),
    ]

    def __init__(self, *, sources_dir: str | None = None, **kwargs):
        self._sources_dir = sources_dir
        super().__init__(**kwargs)

    def _sources(self) -> pathlib.Path:
        return pathlib.Path(self._sources_dir) if self._sources_dir else fetch.emoji_sources()

    def _info(self) -> tfds.core.DatasetInfo:
        entries, groups, subgroups = load_metadata(self._sources()) if self._can_read() else (
            [], [], [])
        return self.dataset_info_from_configs(
            features=features(groups, subgroups), supervised_keys=None,
            homepage='https://www.npmjs.com/package/emoji-datasource',
            license='Artwork: Google Noto Emoji (Apache-2.0), Twitter Twemoji (CC-BY-4.0); '
                    'names: emojibase-data (MIT).')

    def _can_read(self) -> bool:
        try:
            self._sources()
            return True
        except RuntimeError:
            return False

    def _split_generators(self, dl_manager):
        del dl_manager
        sources = self._sources()
        entries, _, _ = load_metadata(sources)
        return {style: self._generate_examples(sources, entries, style) for style in STYLES}

    def _generate_examples(self, sources: pathlib.Path, entries: list[dict], style: str):
        folder = sources / f'emoji-datasource-{style}' / 'package' / 'img' / style / '64'
        for e in entries:
            png = folder / e['image']
            if not png.exists():
                continue
            caption = e['label']
            if self.builder_config.keywords and e['keywords']:
                caption += ', ' + ', '.join(k for k in e['keywords'] if k != e['label'])
            yield e['hexcode'], {'image': png_on_white(png), 'caption': caption,
                                 'key': f'{style}/{e["hexcode"]}', 'label': e['group'],
                                 'subgroup': e['subgroup']}
