"""The `emoji_styles` tfds builder: one name, several artists — natural many-to-many pairs.

The 1,911 emoji of the `emoji` dataset, trained on two artists' drawings at once (split
`train`: Google Noto and Twitter Twemoji, 3,822 pairs, so every caption belongs to two images
and a batch can hold both) and evaluated on a third artist's (split `openmoji`: OpenMoji's
colour artwork, a line-drawn style neither training artist resembles, rendered from SVG to
64 x 64 on white). Captions are the emoji's English label; the group and subgroup are labels
for zero-shot classification, as in `emoji`. Sources: `psd_jax.data.fetch.emoji_sources()` and
`openmoji_sources()`.
"""

from __future__ import annotations

import csv
import io
import pathlib

import tensorflow_datasets as tfds

from psd_jax.data import fetch
from psd_jax.data.emoji import IMAGE_SIZE, features, load_metadata, png_on_white

TRAIN_STYLES = ('google', 'twitter')


def hex_key(hexcode: str) -> str:
    """Code points without the emoji variation selector, so that emoji-datasource's '263A-FE0F'
    and OpenMoji's '263A' name the same emoji."""
    return '-'.join(p for p in hexcode.upper().split('-') if p != 'FE0F')


def openmoji_svgs(sources: pathlib.Path) -> dict[str, pathlib.Path]:
    """hex_key -> OpenMoji colour SVG, for every row of openmoji.csv whose file exists."""
    package = sources / 'openmoji' / 'package'
    with open(package / 'data' / 'openmoji.csv', encoding='utf-8', newline='') as f:
        rows = list(csv.DictReader(f))
    svgs = {}
    for row in rows:
        svg = package / 'color' / 'svg' / f"{row['hexcode']}.svg"
        if svg.exists():
            svgs.setdefault(hex_key(row['hexcode']), svg)
    return svgs


def render_svg(svg: pathlib.Path) -> io.BytesIO:
    """The SVG rasterised at IMAGE_SIZE and composited on white, as RGB PNG bytes."""
    try:
        import resvg_py
    except ImportError as e:  # a dependency of psd_jax; only a broken install lacks it
        raise RuntimeError('the emoji_styles dataset renders OpenMoji SVGs with resvg_py: '
                           '`python -m pip install resvg_py`') from e
    png = resvg_py.svg_to_bytes(svg_path=str(svg), width=IMAGE_SIZE, height=IMAGE_SIZE,
                                skip_system_fonts=True)
    return png_on_white(io.BytesIO(bytes(png)))


class EmojiStyles(tfds.core.GeneratorBasedBuilder):
    """Emoji names with two artists' drawings for training and a third artist's held out."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'emoji-datasource 16.0.0 (Google, Twitter), OpenMoji 17.0.0, '
                              'emojibase-data 17.0.0 names.'}

    def __init__(self, *, emoji_dir: str | None = None, openmoji_dir: str | None = None,
                 **kwargs):
        self._emoji_dir, self._openmoji_dir = emoji_dir, openmoji_dir
        super().__init__(**kwargs)

    def _sources(self) -> tuple[pathlib.Path, pathlib.Path]:
        emoji = pathlib.Path(self._emoji_dir) if self._emoji_dir else fetch.emoji_sources()
        openmoji = (pathlib.Path(self._openmoji_dir) if self._openmoji_dir
                    else fetch.openmoji_sources())
        return emoji, openmoji

    def _info(self) -> tfds.core.DatasetInfo:
        try:
            _, groups, subgroups = load_metadata(self._sources()[0])
        except RuntimeError:  # sources not fetchable here: the info of a prepared copy is read
            groups, subgroups = [], []
        return self.dataset_info_from_configs(
            features=features(groups, subgroups), supervised_keys=None,
            homepage='https://openmoji.org',
            license='Artwork: Google Noto Emoji (Apache-2.0), Twitter Twemoji (CC-BY-4.0), '
                    'OpenMoji (CC BY-SA 4.0); names: emojibase-data (MIT).')

    def _split_generators(self, dl_manager):
        del dl_manager
        emoji, openmoji = self._sources()
        entries, _, _ = load_metadata(emoji)
        svgs = openmoji_svgs(openmoji)
        folders = {s: emoji / f'emoji-datasource-{s}' / 'package' / 'img' / s / '64'
                   for s in TRAIN_STYLES}
        # the emoji every artist drew: each training caption has its held-out drawing
        entries = [e for e in entries if hex_key(e['hexcode']) in svgs
                   and all((folders[s] / e['image']).exists() for s in TRAIN_STYLES)]
        return {split: self._generate_examples(split, entries, folders, svgs)
                for split in ('train', 'openmoji')}

    @staticmethod
    def _example(e: dict, style: str, image: io.BytesIO) -> tuple[str, dict]:
        key = f'{style}/{e["hexcode"]}'
        return key, {'image': image, 'caption': e['label'], 'key': key, 'label': e['group'],
                     'subgroup': e['subgroup']}

    def _generate_examples(self, split: str, entries: list[dict],
                           folders: dict[str, pathlib.Path], svgs: dict[str, pathlib.Path]):
        for e in entries:
            if split == 'openmoji':
                yield self._example(e, 'openmoji', render_svg(svgs[hex_key(e['hexcode'])]))
                continue
            for style in TRAIN_STYLES:
                yield self._example(e, style, png_on_white(folders[style] / e['image']))
