"""The work of preparing users' data, one unit at a time: a tar shard of image-caption pairs or
a class folder of images becomes (key, example) pairs plus the counts of what was skipped.

The tfds builders (builders.py) run these functions in one process or as the steps of an
Apache Beam pipeline (one shard or folder per element), so the examples are the same whichever
runner made them. Paths may be local or remote (gs://...: etils.epath).
"""

from __future__ import annotations

import io
import pathlib
import tarfile
from typing import Iterator

from PIL import Image

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
PAIR_REASONS = ('undecodable_image', 'missing_caption', 'missing_image', 'too_small_image')
MIN_IMAGE_SIDE = 8  # pixels: a smaller image (a 1x1 placeholder of a failed download) is skipped
JPEG_QUALITY = 95  # re-encoding resized images (img2dataset's default)


def as_path(path) -> pathlib.Path:
    """A local pathlib.Path, or an etils.epath.Path for a remote (gs://, s3://) location."""
    text = str(path)
    if '://' in text:
        from etils import epath
        return epath.Path(text)
    return pathlib.Path(text).expanduser()


TOO_SMALL = io.BytesIO()  # checked_image's answer for an image under MIN_IMAGE_SIDE


def checked_image(data: bytes, resize_shorter: int = 0) -> io.BytesIO | None:
    """The image's bytes, None when they do not decode fully, TOO_SMALL when a side is under
    MIN_IMAGE_SIDE pixels.

    Every image is stored as it came (its mode kept: alpha, palette, grey, CMYK), because
    open_clip's evaluation transform resizes and crops in the image's own mode and converts to
    RGB last (psd_jax/data/transforms.py); the input pipeline decodes the bytes itself.
    `resize_shorter` > 0: an image whose shorter side is longer is resized (bicubic, aspect
    kept) to that shorter side and re-encoded (JPEG at quality 95, or PNG when it has
    transparency or was not a JPEG), so that training does not decode multi-megapixel images
    every epoch (img2dataset's resize_mode=keep_ratio); smaller images are kept as they are.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes the whole image: truncated files fail here
            if min(im.size) < MIN_IMAGE_SIDE:
                return TOO_SMALL
            if resize_shorter <= 0 or min(im.size) <= resize_shorter:
                return io.BytesIO(data)
            return io.BytesIO(_resized(im, resize_shorter))
    except Exception:  # PIL raises many types for corrupt data  # noqa: BLE001
        return None


def _resized(im: Image.Image, shorter: int) -> bytes:
    """`im` with its shorter side resized to `shorter`, encoded."""
    was_jpeg = im.format == 'JPEG'
    if im.mode == 'P':
        im = im.convert('RGBA' if 'transparency' in im.info else 'RGB')
    elif im.mode not in ('RGB', 'L', 'RGBA', 'LA', 'CMYK'):
        im = im.convert('RGBA' if 'A' in im.getbands() else 'RGB')
    w, h = im.size
    scale = shorter / min(w, h)
    size = (max(shorter, round(w * scale)), max(shorter, round(h * scale)))
    out = im.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if was_jpeg and out.mode in ('RGB', 'L', 'CMYK'):
        out.save(buffer, format='JPEG', quality=JPEG_QUALITY)
    else:
        out.save(buffer, format='PNG')
    return buffer.getvalue()


def read_shard(shard) -> tuple[dict[str, dict[str, bytes]], str]:
    """({key: {suffix: bytes}}, damage) of one tar shard (webdataset: files grouped by their
    stem). A shard damaged part-way (truncated, overwritten) keeps every file read whole before
    the damage (a pair missing its image or caption is then skipped as such), and `damage`
    says what failed ('' for an intact shard)."""
    groups: dict[str, dict[str, bytes]] = {}
    shard = as_path(shard)
    try:
        with shard.open('rb') as f, tarfile.open(fileobj=f) as tar:
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
    with shard.open('rb') as f:  # a cut at a member boundary reads as a shorter archive:
        f.seek(end)              # an intact one ends with at least two zero blocks
        rest = f.read()
    if len(rest) < 2 * tarfile.BLOCKSIZE or rest.strip(b'\0'):
        return groups, f'truncated or damaged after byte {end}: no end-of-archive marker'
    return groups, ''


def shard_pairs(shard, resize_shorter: int = 0
                ) -> tuple[list[tuple[str, dict]], dict[str, int], list[str]]:
    """(examples, skip counts, notes) of one tar shard: examples are (uid, {'image', 'caption',
    'key', 'json'}) with uid '<shard stem>/<key>'; counts are per PAIR_REASONS plus
    'unreadable_shard' / 'truncated_shard'; notes say which pair or shard and why."""
    shard = as_path(shard)
    counts = dict.fromkeys(PAIR_REASONS + ('unreadable_shard', 'truncated_shard'), 0)
    notes: list[str] = []
    groups, damage = read_shard(shard)
    if damage:
        counts['unreadable_shard' if not groups else 'truncated_shard'] += 1
        notes.append(f'{shard.name}: {damage}')
    examples = []
    stem = shard.name[:-len('.tar')] if shard.name.endswith('.tar') else shard.stem
    for key, files in groups.items():
        image = next((files[s] for s in IMAGE_SUFFIXES if s in files), None)
        raw = files.get('.txt', b'')
        try:
            caption = raw.decode('utf-8').strip()
        except UnicodeDecodeError:  # kept, its bad bytes replaced (U+FFFD), and counted
            caption = raw.decode('utf-8', 'replace').strip()
            counts['caption_not_utf8'] = counts.get('caption_not_utf8', 0) + 1
            notes.append(f'{shard.name}/{key}: caption_not_utf8 (kept)')
        reason = ('missing_image' if image is None else 'missing_caption'
                  if not caption else None)
        checked = checked_image(image, resize_shorter) if reason is None else None
        if reason is None and checked is None:
            reason = 'undecodable_image'
        elif checked is TOO_SMALL:
            reason = 'too_small_image'
        if reason is not None:
            counts[reason] += 1
            notes.append(f'{shard.name}/{key}: {reason}')
            continue
        meta = files.get('.json', b'{}').decode('utf-8', 'replace')
        uid = f'{stem}/{key}'
        examples.append((uid, {'image': checked, 'caption': caption, 'key': uid,
                               'json': meta}))
    return examples, counts, notes


def folder_images(split: str, folder, name: str, resize_shorter: int = 0
                  ) -> tuple[list[tuple[str, dict]], dict[str, int], list[str]]:
    """(examples, skip counts, notes) of one class folder `folder/name`: examples are
    (uid, {'image', 'label', 'caption', 'key'}) with uid '<split>/<class>/<file name>'."""
    counts = {'undecodable_image': 0}
    notes: list[str] = []
    examples = []
    class_dir = as_path(folder) / name
    if not class_dir.is_dir():
        return examples, counts, notes
    for path in sorted(class_dir.iterdir(), key=lambda p: p.name):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        checked = checked_image(path.read_bytes(), resize_shorter)
        if checked is None or checked is TOO_SMALL:
            reason = 'undecodable_image' if checked is None else 'too_small_image'
            counts[reason] = counts.get(reason, 0) + 1
            notes.append(f'{split}/{name}/{path.name}: {reason}')
            continue
        key = f'{split}/{name}/{path.name}'
        examples.append((key, {'image': checked, 'label': name,
                               'caption': name.replace('_', ' '), 'key': key}))
    return examples, counts, notes


def shards_in(folder) -> list:
    """The .tar shards of a folder, sorted by name."""
    return sorted((p for p in as_path(folder).glob('*.tar')), key=lambda p: p.name)


def iterate(units, produce, skipped: dict, limit_notes: int = 20) -> Iterator:
    """The examples of every unit in order, in one process: `produce(unit)` gives
    (examples, counts, notes); counts are added into `skipped` and the first `limit_notes`
    notes kept in skipped['shards']."""
    for unit in units:
        examples, counts, notes = produce(unit)
        for reason, count in counts.items():
            skipped[reason] = skipped.get(reason, 0) + count
        room = limit_notes - len(skipped.setdefault('shards', []))
        skipped['shards'].extend(notes[:max(room, 0)])
        yield from examples
