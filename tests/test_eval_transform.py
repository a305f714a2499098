"""open_clip's evaluation preprocessing, pixel for pixel (psd_jax/data/transforms.py).

The fixture (scripts/make_eval_transform_fixture.py, made with open_clip 3.3.0 / torchvision
0.29.1) holds real images of the modes and shapes that used to differ (RGBA, LA, a palette with
transparency, CMYK, grey, 500x375, 375x500, 640x427, 225x226, 28x28) and open_clip's uint8
pixels for them. Tolerance: none; the same PIL calls in the same order give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from psd_jax.data import transforms

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'eval_transform'
DIGESTS = json.loads((FIXTURE / 'open_clip_digests.json').read_text())
NAMES = sorted(DIGESTS['sha256_of_pixels'])


def test_fixture_covers_the_modes_and_shapes():
    modes = {Image.open(FIXTURE / n).mode for n in NAMES}
    assert {'RGBA', 'LA', 'P', 'CMYK', 'L', 'RGB'} <= modes
    sizes = {Image.open(FIXTURE / n).size for n in NAMES}
    assert {(500, 375), (375, 500), (640, 427), (225, 226)} <= sizes
    assert len(NAMES) >= 12


@pytest.mark.parametrize('name', NAMES)
def test_same_pixels_as_open_clip(name):
    data = (FIXTURE / name).read_bytes()
    expected = np.load(FIXTURE / f'open_clip_{DIGESTS["full_size"]}px.npz')[name]
    got = transforms.eval_view(data, DIGESTS['full_size'])
    assert got.dtype == np.uint8 and got.shape == expected.shape
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() == 0, f'{name}: {np.mean(diff > 0):.1%} of values differ, max {diff.max()}'
    for size, digest in DIGESTS['sha256_of_pixels'][name].items():
        got = transforms.eval_view(data, int(size))
        assert hashlib.sha256(got.tobytes()).hexdigest() == digest, f'{name} at {size} px'


def test_torchvision_size_arithmetic():
    # 4:3 photos: the long side is truncated (298, not 299), the offset rounded half to even
    assert transforms.resized_size(500, 375, 224) == (298, 224)
    assert transforms.resized_size(375, 500, 224) == (224, 298)
    assert transforms.resized_size(640, 427, 224) == (335, 224)
    assert transforms.center_crop_box(298, 224, 224) == (37, 0, 261, 224)
    assert transforms.center_crop_box(225, 224, 224) == (0, 0, 224, 224)  # round(0.5) = 0
    assert transforms.center_crop_box(227, 224, 224) == (2, 0, 226, 224)  # round(1.5) = 2


def test_alpha_is_dropped_after_resampling_not_before():
    """Compositing or dropping alpha first gives other pixels: the order is the point."""
    data = (FIXTURE / 'photo_rgba_320x240.png').read_bytes()
    ours = transforms.eval_view(data, 96)
    rgb_first = transforms.eval_view(Image.open(io.BytesIO(data)).convert('RGB'), 96)
    assert np.abs(ours.astype(int) - rgb_first.astype(int)).max() > 0


def test_live_against_open_clip_on_more_images(tmp_path):
    """Where open_clip is installed: random crops of the fixture images in every mode, at odd
    sizes, against open_clip's transform itself."""
    open_clip = pytest.importorskip('open_clip', reason='open_clip (with torch) is not installed; '
                                    'the committed fixture above checks the same pixels')
    rng = np.random.default_rng()
    for name in NAMES:
        source = Image.open(FIXTURE / name)
        for _ in range(3):
            w, h = source.size
            cw, ch = int(rng.integers(max(8, w // 3), w + 1)), int(rng.integers(max(8, h // 3), h + 1))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = source.crop((left, top, left + cw, top + ch))
            buffer = io.BytesIO()
            crop.save(buffer, format='PNG' if source.mode != 'CMYK' else 'TIFF')
            for size in (32, 224, int(rng.integers(50, 300))):
                steps = open_clip.image_transform(size, is_train=False).transforms[:-2]
                im = Image.open(io.BytesIO(buffer.getvalue()))
                for step in steps:
                    im = step(im)
                got = transforms.eval_view(buffer.getvalue(), size)
                np.testing.assert_array_equal(got, np.asarray(im), err_msg=f'{name} {crop.size}')
