"""Image preprocessing on the host: decoding, open_clip's evaluation transform, training crops.

`eval_view` reproduces, pixel for pixel, the evaluation transform open_clip builds for a square
model (`open_clip.image_transform(size, is_train=False)`, resize mode 'shortest'), which is
what CLIP_benchmark and published zero-shot numbers use:

1. torchvision `Resize(size, BICUBIC)`: the shorter side becomes `size`, the longer side
   `int(size * long / short)` (truncated, not rounded), resampled by PIL's bicubic filter
   (antialiased when shrinking) *in the image's own mode*: RGBA and LA resample with
   premultiplied alpha, palette images (P) with nearest neighbours (PIL's rule), CMYK in CMYK;
2. torchvision `CenterCrop(size)`: offsets `int(round((H - size) / 2))`, Python's round
   (half to even);
3. `convert('RGB')` last, which drops alpha (without compositing on a background).

Training crops (`random_resized_crop`) are this project's own augmentation and work on RGB
arrays.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image


def decode(image: Any) -> Image.Image:
    """A PIL image from encoded bytes (a record read with decoding skipped) or from a decoded
    uint8 array (H, W), (H, W, 1) or (H, W, 3); encoded images keep their own mode."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        im = Image.open(io.BytesIO(bytes(image)))
        im.load()
        return im
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array, np.uint8))


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(size): shorter side -> size, the longer side
    scaled and truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of torchvision's CenterCrop(size) (the image is
    at least size x size here: eval_view resizes first)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def eval_view(image: Any, size: int) -> np.ndarray:
    """uint8 (size, size, 3): open_clip's evaluation transform before ToTensor/Normalize (the
    model normalises on the device). `image`: a PIL image, encoded bytes or a uint8 array."""
    im = image if isinstance(image, Image.Image) else decode(image)
    width, height = im.size
    new = resized_size(width, height, size)
    if new != (width, height):
        im = im.resize(new, Image.Resampling.BICUBIC)
    im = im.crop(center_crop_box(*new, size))
    with warnings.catch_warnings():  # PIL advises RGBA for palettes with transparency; open_clip
        warnings.simplefilter('ignore', UserWarning)  # converts to RGB, and so do we
        rgb = im.convert('RGB')
    return np.ascontiguousarray(np.asarray(rgb), np.uint8)


def rgb_array(image: Any) -> np.ndarray:
    """uint8 (H, W, 3) for the training augmentation: grey repeated, alpha and palettes
    converted by PIL's convert('RGB') (as open_clip's training transform does, after its
    crop). `image`: a PIL image, encoded bytes or a uint8 array."""
    im = image if isinstance(image, Image.Image) else decode(image)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        return np.asarray(im.convert('RGB'))


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """A random crop covering `scale` of the area with aspect in `ratio`, resized to size^2."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            break
    else:
        ch, cw = min(h, w), min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(image[top:top + ch, left:left + cw])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
