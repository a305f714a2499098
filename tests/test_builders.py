"""tfds builders on small files the tests make: tar shards with corrupt images and empty
captions, a class-folder tree, IDX files; read back through tfds data sources and grain."""

from __future__ import annotations

import gzip
import io
import json
import pathlib
import struct
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from psd_jax.data import builders, datasets, pipeline, transforms
from psd_jax.data.fashion_mnist import FashionMnistLocal, FashionMnistConfig, CLASS_NAMES


def image_bytes(rng, fmt='JPEG', mode='RGB', size=(40, 30)):
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(array).convert(mode)
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    """2 train shards + 1 val shard: 14 good pairs, 2 corrupt images, 2 empty captions,
    1 caption without image; expected counts returned alongside."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp('shards')
    (root / 'train').mkdir()
    (root / 'val').mkdir()
    good = {'train': 0, 'validation': 0}
    with tarfile.open(root / 'train' / '00000.tar', 'w') as tar:
        for i in range(6):
            add(tar, f'{i:05d}.jpg', image_bytes(rng))
            add(tar, f'{i:05d}.txt', f'a photo number {i}'.encode())
            add(tar, f'{i:05d}.json', json.dumps({'url': f'http://x/{i}'}).encode())
        good['train'] += 6
        add(tar, '00006.jpg', image_bytes(rng)[:200])  # truncated JPEG
        add(tar, '00006.txt', b'a broken picture')
        add(tar, '00007.png', image_bytes(rng, 'PNG', 'RGBA'))  # alpha: kept as it is
        add(tar, '00007.txt', b'   ')  # empty caption
        add(tar, '00008.txt', b'a caption without its image')
    with tarfile.open(root / 'train' / '00001.tar', 'w') as tar:
        for i in range(5):
            add(tar, f'{i:05d}.png', image_bytes(rng, 'PNG', 'L'))  # grey: kept as it is
            add(tar, f'{i:05d}.txt', f'grey picture {i}'.encode())
        good['train'] += 5
        add(tar, '00005.jpg', b'this is not an image')
        add(tar, '00005.txt', b'garbage')
    with tarfile.open(root / 'val' / '00000.tar', 'w') as tar:
        for i in range(3):
            add(tar, f'{i:05d}.jpg', image_bytes(rng))
            add(tar, f'{i:05d}.txt', f'held out {i}'.encode())
        good['validation'] += 3
        add(tar, '00003.jpg', image_bytes(rng))
        add(tar, '00003.txt', b'')
    return root, good


def test_image_text_shards_skip_and_count(shards, tmp_path):
    root, good = shards
    config = builders.ImageTextShardsConfig(name='tiny', path=str(root))
    builder = builders.ImageTextShards(config=config, data_dir=str(tmp_path))
    builder.download_and_prepare(file_format='array_record')
    assert builder.info.splits['train'].num_examples == good['train']
    assert builder.info.splits['validation'].num_examples == good['validation']
    skipped = builder.info.metadata['skipped']
    counts = {k: v for k, v in skipped['train'].items() if k != 'shards'}
    assert counts == {'undecodable_image': 2, 'missing_caption': 1, 'missing_image': 1,
                      'too_small_image': 0, 'unreadable_shard': 0, 'truncated_shard': 0,
                      'caption_not_utf8': 0}
    assert sorted(skipped['train']['shards']) == [  # the records involved, by shard
        '00000.tar/00006: undecodable_image', '00000.tar/00007: missing_caption',
        '00000.tar/00008: missing_image', '00001.tar/00005: undecodable_image']
    assert skipped['validation']['missing_caption'] == 1
    # the counts are stored with the dataset and come back when it is read again
    reread = tfds.builder('image_text_shards/tiny', data_dir=str(tmp_path))
    assert reread.info.metadata['skipped']['train']['undecodable_image'] == 2
    source = datasets.data_source('image_text_shards/tiny', 'train', str(tmp_path))
    records = [source[i] for i in range(len(source))]
    # stored as they came (open_clip's eval transform resamples in the source mode); every one
    # decodes, and the pipeline's views are RGB
    modes = {transforms.decode(r['image']).mode for r in records}
    assert {'RGB', 'L'} <= modes
    assert all(transforms.eval_view(r['image'], 16).shape == (16, 16, 3) for r in records)
    captions = sorted(r['caption'].decode() for r in records)
    assert captions[0] == 'a photo number 0' and 'garbage' not in captions
    urls = [json.loads(r['json'].decode()).get('url') for r in records]
    assert sum(bool(u) for u in urls) == 6  # the first shard's pairs carry their KEY.json


def test_shard_builder_bad_paths_are_named(tmp_path):
    missing = builders.ImageTextShards(
        config=builders.ImageTextShardsConfig(name='missing', path=str(tmp_path / 'nope')),
        data_dir=str(tmp_path / 'out'))
    with pytest.raises(FileNotFoundError, match='nope does not exist'):
        missing.download_and_prepare(file_format='array_record')
    (tmp_path / 'empty').mkdir()
    empty = builders.ImageTextShards(
        config=builders.ImageTextShardsConfig(name='empty', path=str(tmp_path / 'empty')),
        data_dir=str(tmp_path / 'out'))
    with pytest.raises(FileNotFoundError, match=r'no \.tar shards in .*empty'):
        empty.download_and_prepare(file_format='array_record')


def write_pairs(path, n, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, 'w') as tar:
        for i in range(n):
            add(tar, f'{i:05d}.jpg', image_bytes(rng))
            add(tar, f'{i:05d}.txt', f'pair {i}'.encode())


def test_a_truncated_shard_keeps_its_intact_pairs(tmp_path):
    """A shard cut at 60%: every pair stored whole before the cut is kept, the shard named."""
    rng = np.random.default_rng(2)
    shard = tmp_path / 'cut' / '00000.tar'
    write_pairs(shard, 20, rng)
    with tarfile.open(shard) as tar:
        ends = {m.name: m.offset_data + m.size for m in tar.getmembers()}
    blob = shard.read_bytes()
    cut = len(blob) * 6 // 10
    shard.write_bytes(blob[:cut])
    whole = sum(1 for i in range(20) if ends[f'{i:05d}.txt'] <= cut and ends[f'{i:05d}.jpg'] <= cut)
    assert 0 < whole < 20
    builder = builders.ImageTextShards(
        config=builders.ImageTextShardsConfig(name='cut', path=str(tmp_path / 'cut')),
        data_dir=str(tmp_path / 'out'))
    builder.download_and_prepare(file_format='array_record')
    assert builder.info.splits['train'].num_examples == whole
    skipped = builder.info.metadata['skipped']['train']
    assert skipped['truncated_shard'] == 1 and skipped['shards'][0].startswith('00000.tar: ')


def test_a_folder_without_a_usable_pair_is_named(tmp_path):
    folder = tmp_path / 'bad'
    folder.mkdir()
    with tarfile.open(folder / '00000.tar', 'w') as tar:
        add(tar, '00000.jpg', b'not an image')
        add(tar, '00000.txt', b'a caption')
    builder = builders.ImageTextShards(
        config=builders.ImageTextShardsConfig(name='bad', path=str(folder)),
        data_dir=str(tmp_path / 'out'))
    with pytest.raises(ValueError, match=r"bad \(split 'train'\) has no usable .*"
                                         r"'undecodable_image': 1"):
        builder.download_and_prepare(file_format='array_record')


def test_a_re_pointed_path_or_changed_shards_are_prepared_again(tmp_path):
    from psd_jax.data import datasets
    rng = np.random.default_rng(3)
    write_pairs(tmp_path / 'first' / '00000.tar', 3, rng)
    write_pairs(tmp_path / 'second' / '00000.tar', 5, rng)
    out = tmp_path / 'tfds'
    sizes = []
    for path in ('first', 'first', 'second'):
        builder = datasets.prepare('image_text_shards', out, 'mine', str(tmp_path / path))
        sizes.append(builder.info.splits['train'].num_examples)
    write_pairs(tmp_path / 'second' / '00001.tar', 2, rng)  # a shard added
    builder = datasets.prepare('image_text_shards', out, 'mine', str(tmp_path / 'second'))
    sizes.append(builder.info.splits['train'].num_examples)
    assert sizes == [3, 3, 5, 7]
    source = dict(builder.info.metadata)['source']
    assert source['path'] == str((tmp_path / 'second').resolve()) and source['files'] == 2


def test_prepare_command_takes_a_path(tmp_path, capsys):
    from psd_jax.data import datasets
    write_pairs(tmp_path / 'mine' / 'train' / '00000.tar', 2, np.random.default_rng(4))
    datasets.main(['image_text_shards', '--path', str(tmp_path / 'mine'), '--config', 'mine',
                   '--data_dir', str(tmp_path / 'tfds')])
    assert "image_text_shards: {'train': 2}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        datasets.main(['image_text_shards', '--path', str(tmp_path / 'absent'),
                       '--data_dir', str(tmp_path / 'tfds')])
    assert exit_info.value.code == 2


def test_a_multi_host_run_refuses_to_prepare_the_users_data(tmp_path, monkeypatch):
    """Every host of a multi-host run checks that the path-based dataset is prepared and
    refuses, naming the dataset, the data_dir and the command, when it is not; once prepared
    (on one machine, as the command says), the run opens it without preparing anything."""
    import jax
    from psd_jax import config as config_lib
    from psd_jax.data import datasets, from_config
    write_pairs(tmp_path / 'mine' / 'train' / '00000.tar', 3, np.random.default_rng(5))
    config = config_lib.base_config()
    config.data.dataset, config.data.builder_config = 'image_text_shards', 'mine'
    config.data.path, config.data.data_dir = str(tmp_path / 'mine'), str(tmp_path / 'tfds')
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    with pytest.raises(ValueError, match=(
            rf'image_text_shards/mine is not prepared in data_dir {tmp_path / "tfds"} .*'
            rf'python -m psd_jax.data.datasets image_text_shards --path {tmp_path / "mine"} '
            '--config mine')):
        from_config.open_split(config, 'train')
    assert not (tmp_path / 'tfds').exists()  # nothing was prepared
    datasets.main(['image_text_shards', '--path', config.data.path, '--config', 'mine',
                   '--data_dir', config.data.data_dir])
    monkeypatch.setattr(datasets, 'prepare', None)  # a multi-host run must not call it
    assert len(from_config.open_split(config, 'train')) == 3


def test_image_folder_classification(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (('train', 3), ('test', 2)):
        for cls in ('golden_retriever', 'tabby_cat', 'red_apple'):
            folder = tmp_path / 'tree' / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f'{i}.jpg').write_bytes(image_bytes(rng))
    (tmp_path / 'tree' / 'train' / 'red_apple' / 'bad.jpg').write_bytes(b'\xff\xd8 nope')
    (tmp_path / 'tree' / 'train' / 'red_apple' / 'notes.txt').write_text('ignored')
    config = builders.ImageFolderConfig(name='tree', path=str(tmp_path / 'tree'))
    builder = builders.ImageFolderClassification(config=config, data_dir=str(tmp_path / 'out'))
    builder.download_and_prepare(file_format='array_record')
    assert builder.info.splits['train'].num_examples == 9
    assert builder.info.splits['test'].num_examples == 6
    assert builder.info.features['label'].names == ['golden_retriever', 'red_apple', 'tabby_cat']
    assert builder.info.metadata['skipped']['train'] == {
        'undecodable_image': 1, 'shards': ['train/red_apple/bad.jpg: undecodable_image']}
    source = datasets.data_source('image_folder_classification/tree', 'test',
                                  str(tmp_path / 'out'))
    labels = sorted(int(source[i]['label']) for i in range(len(source)))
    assert labels == [0, 0, 1, 1, 2, 2]
    captions = {source[i]['caption'].decode() for i in range(len(source))}
    assert captions == {'golden retriever', 'red apple', 'tabby cat'}


def write_idx(folder: pathlib.Path, prefix: str, images: np.ndarray, labels: np.ndarray):
    with gzip.open(folder / f'{prefix}-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>IIII', 2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder / f'{prefix}-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 2049, len(labels)) + labels.tobytes())


def test_fashion_mnist_from_idx_files_through_grain(tmp_path):
    rng = np.random.default_rng(2)
    images = {p: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
              for p, n in (('train', 30), ('t10k', 10))}
    labels = {p: rng.integers(0, 10, len(images[p])).astype(np.uint8) for p in images}
    for p in images:
        write_idx(tmp_path, p, images[p], labels[p])
    builder = FashionMnistLocal(config=FashionMnistConfig(name='fake', path=str(tmp_path)),
                                data_dir=str(tmp_path / 'out'))
    builder.download_and_prepare(file_format='array_record')
    assert builder.info.features['label'].names == list(CLASS_NAMES)
    source = tfds.data_source('fashion_mnist_local/fake', split='test',
                              data_dir=str(tmp_path / 'out'))
    assert len(source) == 10
    by_key = {int(source[i]['key']): source[i] for i in range(len(source))}
    for i in range(10):
        np.testing.assert_array_equal(by_key[i]['image'][:, :, 0], images['t10k'][i])
        assert by_key[i]['label'] == labels['t10k'][i]
        assert by_key[i]['caption'].decode() == f'a photo of a {CLASS_NAMES[labels["t10k"][i]]}.'
    loader = pipeline.make_loader(source, global_batch=4, image_size=28, tokenizer=_ids,
                                  context_length=8, train=False, drop_remainder=False)
    batches = list(loader)
    assert sum(len(b['label']) for b in batches) == 10
    assert batches[0]['image'].shape == (4, 28, 28, 3)


def _ids(text, length):
    out = np.zeros(length, np.int32)
    ids = [min(ord(c), 255) for c in text][:length]
    out[:len(ids)] = ids
    return out


def test_fashion_mnist_bad_files_are_named(tmp_path):
    builder = FashionMnistLocal(config=FashionMnistConfig(name='none', path=str(tmp_path)),
                                data_dir=str(tmp_path / 'out'))
    with pytest.raises(FileNotFoundError, match='train-images-idx3-ubyte.gz'):
        builder.download_and_prepare(file_format='array_record')


@pytest.fixture(scope='module')
def shard_source(shards, tmp_path_factory):
    root, good = shards
    data_dir = tmp_path_factory.mktemp('shard_tfds')
    builders.ImageTextShards(config=builders.ImageTextShardsConfig(name='grain', path=str(root)),
                             data_dir=str(data_dir)).download_and_prepare(
        file_format='array_record')
    return datasets.data_source('image_text_shards/grain', 'train', str(data_dir))


@pytest.mark.parametrize('workers', [1, 2])
def test_shards_through_grain_cover_each_pair_once(shard_source, workers):
    loader = pipeline.make_loader(shard_source, global_batch=4, image_size=24, tokenizer=_ids,
                                  context_length=8, train=True, seed=7, num_epochs=1,
                                  worker_count=workers, keep=('key',), drop_remainder=False)
    keys = [k for batch in loader for k in batch['key'].tolist()]
    assert len(keys) == len(shard_source) == 11 and len(set(keys)) == 11


def test_shards_iterator_resumes_exactly_with_two_workers(shard_source):
    def loader():
        return pipeline.make_loader(shard_source, global_batch=2, image_size=24, tokenizer=_ids,
                                    context_length=8, train=True, seed=11, worker_count=2,
                                    keep=('key',))
    it = iter(loader())
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]  # crosses an epoch boundary (11 pairs, batch 2)
    resumed = iter(loader())
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got['key'].tolist() == want['key'].tolist()
        np.testing.assert_array_equal(got['image'], want['image'])  # same random crops too


def test_a_tiny_image_is_skipped_and_a_non_utf8_caption_counted(tmp_path, rng):
    """A 1x1 placeholder (a failed download) is skipped as too_small_image; a caption that is
    not UTF-8 is kept with its bad bytes replaced and counted as caption_not_utf8."""
    root = tmp_path / 'odd'
    root.mkdir()
    with tarfile.open(root / '00000.tar', 'w') as tar:
        add(tar, '00000.jpg', image_bytes(rng))
        add(tar, '00000.txt', 'caf\u00e9 au lait'.encode('latin-1'))  # not UTF-8
        add(tar, '00001.png', image_bytes(rng, 'PNG', 'RGB', size=(1, 1)))
        add(tar, '00001.txt', b'a pixel')
        add(tar, '00002.jpg', image_bytes(rng))
        add(tar, '00002.txt', b'a fine pair')
    builder = builders.ImageTextShards(
        config=builders.ImageTextShardsConfig(name='odd', path=str(root)), data_dir=str(tmp_path))
    builder.download_and_prepare(file_format='array_record')
    skipped = builder.info.metadata['skipped']['train']
    assert builder.info.splits['train'].num_examples == 2
    assert skipped['too_small_image'] == 1 and skipped['caption_not_utf8'] == 1
    assert '00000.tar/00000: caption_not_utf8 (kept)' in skipped['shards']
    source = datasets.data_source('image_text_shards/odd', 'train', str(tmp_path))
    captions = sorted(source[i]['caption'].decode() for i in range(len(source)))
    assert captions == ['a fine pair', 'caf\ufffd au lait']
