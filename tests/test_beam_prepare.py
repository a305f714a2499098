"""Preparation on Apache Beam (psd_jax/data/datasets.py Preparation): real emoji artwork,
written by the test as webdataset tar shards of 256-px JPEGs (with one damaged image and one
pair without a caption), prepared in one process and by Beam's DirectRunner on 2 worker
processes: the same records (an order-independent fingerprint of every field) and the same
skip counts. Resizing at preparation: the shorter side, aspect kept, smaller images as they
came."""

from __future__ import annotations

import io
import json
import os
import pathlib
import tarfile

import pytest
from PIL import Image

from psd_jax.data import datasets, shards

SOURCES = pathlib.Path(os.environ.get('PSD_JAX_CACHE', pathlib.Path.home() / '.cache' /
                                      'psd_jax')) / 'emoji_sources'


def add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format='JPEG', quality=90, **kwargs)
    return out.getvalue()


@pytest.fixture(scope='module')
def emoji_shards(tmp_path_factory):
    if not (SOURCES / '.complete').exists():
        pytest.skip('emoji data absent: run `python -m psd_jax.data.fetch`')
    from psd_jax.data.emoji import load_metadata, png_on_white
    entries, _, _ = load_metadata(SOURCES)
    folder = SOURCES / 'emoji-datasource-google' / 'package' / 'img' / 'google' / '64'
    root = tmp_path_factory.mktemp('emoji_shards')
    for shard in range(4):
        with tarfile.open(root / f'{shard:05d}.tar', 'w') as tar:
            for i, entry in enumerate(entries[shard * 24:(shard + 1) * 24]):
                art = Image.open(png_on_white(folder / entry['image'])).resize(
                    (256, 256), Image.Resampling.BICUBIC)
                data = jpeg(art)
                if shard == 2 and i == 5:
                    data = data[:300]  # a damaged download
                add(tar, f'{i:05d}.jpg', data)
                if not (shard == 3 and i == 7):  # a pair that lost its caption
                    add(tar, f'{i:05d}.txt', f'an emoji of {entry["label"]}'.encode())
                add(tar, f'{i:05d}.json', json.dumps({'hexcode': entry['hexcode']}).encode())
    return root


def prepared(root, data_dir, how):
    builder = datasets.prepare('image_text_shards', data_dir, 'emoji_tars', str(root), how)
    source = datasets.data_source('image_text_shards/emoji_tars', 'train', data_dir)
    return builder, datasets.content_fingerprint(source)


def test_beam_on_two_workers_prepares_the_same_records(emoji_shards, tmp_path):
    pytest.importorskip('apache_beam', reason="apache-beam not installed: pip install -e "
                        "'.[beam]'")
    local, local_print = prepared(emoji_shards, tmp_path / 'local',
                                  datasets.Preparation(workers=0))
    beam, beam_print = prepared(emoji_shards, tmp_path / 'beam', datasets.Preparation(workers=2))
    assert local_print == beam_print and local_print[0] == 94  # 96 pairs, 2 skipped
    skipped = [b.info.metadata['skipped']['train'] for b in (local, beam)]
    for counts in skipped:
        assert counts['undecodable_image'] == 1 and counts['missing_caption'] == 1, counts
    assert {k: v for k, v in skipped[0].items() if k != 'shards'} == {
        k: v for k, v in skipped[1].items() if k != 'shards'}
    assert beam.info.metadata['preparation'] == {'resize_shorter': 0}


def test_beam_prepares_class_folders_as_one_process_does(tmp_path):
    """image_folder_classification: one Beam element per class folder; the same records."""
    pytest.importorskip('apache_beam', reason="apache-beam not installed: pip install -e "
                        "'.[beam]'")
    if not (SOURCES / '.complete').exists():
        pytest.skip('emoji data absent: run `python -m psd_jax.data.fetch`')
    from psd_jax.data.emoji import load_metadata, png_on_white
    entries, _, _ = load_metadata(SOURCES)
    folder = SOURCES / 'emoji-datasource-google' / 'package' / 'img' / 'google' / '64'
    root = tmp_path / 'folders'
    for entry in entries[::25][:60]:  # every 25th: several groups, so several elements
        target = root / 'train' / entry['group'].replace(' ', '_').replace('&', 'and')
        target.mkdir(parents=True, exist_ok=True)
        (target / f'{entry["hexcode"]}.jpg').write_bytes(
            jpeg(Image.open(png_on_white(folder / entry['image']))))
    (sorted((root / 'train').iterdir())[0] / 'broken.jpg').write_bytes(b'not an image')
    prints, skipped = [], []
    for name, how in (('local', datasets.Preparation(workers=0)),
                      ('beam', datasets.Preparation(workers=2))):
        builder = datasets.prepare('image_folder_classification', tmp_path / name, 'emoji_groups',
                                   str(root), how)
        source = datasets.data_source('image_folder_classification/emoji_groups', 'train',
                                      tmp_path / name)
        prints.append(datasets.content_fingerprint(source))
        skipped.append(builder.info.metadata['skipped']['train']['undecodable_image'])
    assert prints[0] == prints[1] and prints[0][0] == 60 and skipped == [1, 1]
    assert len(builder.info.features['label'].names) >= 5


def test_resize_at_preparation_keeps_the_aspect(emoji_shards, tmp_path):
    wide = Image.new('RGB', (640, 400), (200, 30, 60))
    small = Image.new('RGB', (100, 80), (10, 20, 30))
    out = Image.open(shards.checked_image(jpeg(wide), resize_shorter=256))
    assert out.size == (410, 256) and out.format == 'JPEG'
    kept = jpeg(small)
    assert shards.checked_image(kept, resize_shorter=256).getvalue() == kept
    alpha = io.BytesIO()
    Image.new('RGBA', (512, 512), (0, 0, 0, 0)).save(alpha, format='PNG')
    resized = Image.open(shards.checked_image(alpha.getvalue(), resize_shorter=128))
    assert resized.size == (128, 128) and resized.mode == 'RGBA' and resized.format == 'PNG'

    builder, (count, _) = prepared(emoji_shards, tmp_path / 'resized',
                                   datasets.Preparation(workers=0, resize_shorter=128))
    assert count == 94 and builder.info.metadata['preparation'] == {'resize_shorter': 128}
    source = datasets.data_source('image_text_shards/emoji_tars', 'train', tmp_path / 'resized')
    assert Image.open(io.BytesIO(source[0]['image'])).size == (128, 128)
    # asking for another size prepares it again
    again, _ = prepared(emoji_shards, tmp_path / 'resized',
                        datasets.Preparation(workers=0, resize_shorter=64))
    source = datasets.data_source('image_text_shards/emoji_tars', 'train', tmp_path / 'resized')
    assert Image.open(io.BytesIO(source[3]['image'])).size == (64, 64)


def test_beam_is_the_default_only_for_large_sources_on_many_cores(monkeypatch, tmp_path):
    pytest.importorskip('apache_beam', reason="apache-beam not installed")
    (tmp_path / '00000.tar').write_bytes(b'\0' * 4096)
    how = datasets.Preparation()
    monkeypatch.setattr(datasets.os, 'cpu_count', lambda: 16)
    assert how.workers_for(str(tmp_path)) == 0  # 4 KiB: one process
    monkeypatch.setattr(datasets, 'LARGE_SOURCE_BYTES', 1024)
    assert how.workers_for(str(tmp_path)) == 16
    monkeypatch.setattr(datasets.os, 'cpu_count', lambda: 2)
    assert how.workers_for(str(tmp_path)) == 0  # Beam is slower than one process on 2 cores
    assert datasets.Preparation(workers=3).workers_for(str(tmp_path)) == 3
    with pytest.raises(ValueError, match='workers, beam_runner and resize_shorter apply to'):
        datasets.prepare('fashion_mnist_local', tmp_path / 'out', path=str(tmp_path),
                         how=datasets.Preparation(resize_shorter=64))
