"""Make tests/fixtures/eval_transform/: real images and open_clip's evaluation pixels for them.

The images: emoji artwork as distributed (RGBA PNGs and a palette PNG with transparency, from
the npm packages `python -m psd_jax.data.fetch emoji` caches), matplotlib's sample photograph
(grace_hopper.jpg) brought to the shapes ImageNet and COCO images have (500x375, 375x500,
640x427, 225x226; JPEG), a CMYK JPEG, a grey PNG, an LA PNG, a Fashion-MNIST image (28x28 grey,
upsampled) and an RGBA photo (320x240) with an alpha gradient. For each, the uint8 pixels open_clip's
evaluation transform gives before ToTensor (`open_clip.image_transform(size, is_train=False)`:
Resize, CenterCrop, convert('RGB')) are stored in full at 96 px and as SHA-256 digests at 224
and 336 px. Needs torch, torchvision and open-clip-torch (not project dependencies):

    pip install torch==2.14.1 torchvision==0.29.1 open-clip-torch==3.3.0
    python scripts/make_eval_transform_fixture.py
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pathlib

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / 'tests' / 'fixtures' / 'eval_transform'
CACHE = pathlib.Path(os.environ.get('PSD_JAX_CACHE', pathlib.Path.home() / '.cache' / 'psd_jax'))
FULL_SIZE, DIGEST_SIZES = 96, (224, 336)


def _emoji(style: str, mode: str, transparency: bool) -> pathlib.Path:
    folder = CACHE / 'emoji_sources' / f'emoji-datasource-{style}' / 'package' / 'img' / style / '64'
    for path in sorted(folder.glob('*.png')):
        with Image.open(path) as im:
            if im.mode == mode and ('transparency' in im.info) == transparency:
                return path
    raise FileNotFoundError(f'no {mode} emoji in {folder}: run python -m psd_jax.data.fetch emoji')


def _photo() -> Image.Image:
    import matplotlib
    path = pathlib.Path(matplotlib.get_data_path()) / 'sample_data' / 'grace_hopper.jpg'
    return Image.open(path).convert('RGB')


def _fashion_mnist() -> Image.Image:
    with gzip.open('/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz') as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16)
    return Image.fromarray(data[:28 * 28].reshape(28, 28), 'L')


def make_inputs() -> dict[str, bytes]:
    """name -> encoded bytes of each fixture image."""
    def encode(im: Image.Image, fmt: str, **kw) -> bytes:
        out = io.BytesIO()
        im.save(out, format=fmt, **kw)
        return out.getvalue()

    photo = _photo()
    fitted = {size: photo.resize(size, Image.Resampling.LANCZOS)
              for size in ((500, 375), (375, 500), (640, 427), (225, 226), (320, 240))}
    alpha = Image.linear_gradient('L').resize((320, 240))
    rgba_photo = fitted[(320, 240)].copy()
    rgba_photo.putalpha(alpha)
    google = Image.open(_emoji('google', 'RGBA', False))
    return {
        'emoji_rgba.png': _emoji('google', 'RGBA', False).read_bytes(),
        'emoji_twitter_rgba.png': _emoji('twitter', 'RGBA', False).read_bytes(),
        'emoji_palette_transparent.png': _emoji('twitter', 'P', True).read_bytes(),
        'emoji_la.png': encode(google.convert('LA'), 'PNG'),
        'photo_500x375.jpg': encode(fitted[(500, 375)], 'JPEG', quality=90),
        'photo_375x500.jpg': encode(fitted[(375, 500)], 'JPEG', quality=90),
        'photo_640x427.jpg': encode(fitted[(640, 427)], 'JPEG', quality=90),
        'photo_225x226.jpg': encode(fitted[(225, 226)], 'JPEG', quality=90),
        'photo_cmyk_500x375.jpg': encode(fitted[(500, 375)].convert('CMYK'), 'JPEG', quality=90),
        'photo_grey_375x500.png': encode(fitted[(375, 500)].convert('L'), 'PNG'),
        'photo_rgba_320x240.png': encode(rgba_photo, 'PNG'),
        'fashion_mnist_28.png': encode(_fashion_mnist(), 'PNG'),
    }


def open_clip_pixels(data: bytes, size: int) -> np.ndarray:
    """uint8 (size, size, 3): open_clip's eval transform up to (not including) ToTensor."""
    import open_clip
    transform = open_clip.image_transform(size, is_train=False)
    steps = transform.transforms[:-2]  # Resize, CenterCrop, MaybeConvertMode
    assert type(transform.transforms[-2]).__name__ == 'MaybeToTensor', transform
    im = Image.open(io.BytesIO(data))
    for step in steps:
        im = step(im)
    return np.asarray(im)


def main() -> None:
    import open_clip
    import torch
    import torchvision
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs()
    full, digests = {}, {}
    for name, data in inputs.items():
        (OUT / name).write_bytes(data)
        full[name] = open_clip_pixels(data, FULL_SIZE)
        digests[name] = {str(s): hashlib.sha256(open_clip_pixels(data, s).tobytes()).hexdigest()
                         for s in DIGEST_SIZES}
    np.savez_compressed(OUT / f'open_clip_{FULL_SIZE}px.npz', **full)
    (OUT / 'open_clip_digests.json').write_text(json.dumps({
        'made_by': 'scripts/make_eval_transform_fixture.py',
        'versions': {'open_clip': open_clip.__version__, 'torchvision': torchvision.__version__,
                     'torch': torch.__version__, 'pillow': Image.__version__},
        'full_size': FULL_SIZE, 'sha256_of_pixels': digests}, indent=1) + '\n')
    print(f'wrote {len(inputs)} images and their pixels to {OUT}')


if __name__ == '__main__':
    main()
