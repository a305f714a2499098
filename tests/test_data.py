"""The input side on real data: CLIP BPE ids, the emoji tfds builder, grain pipelines (epoch
coverage with 0 and 2 workers, exact resume), caption-noise injection, SentencePiece.

Real data comes from `python -m psd_jax.data.fetch emoji clip_vocab` (CI runs it); tests that
need it skip with that command as the reason when it is absent.
"""

from __future__ import annotations

import gzip
import logging
import pathlib

import numpy as np
import pytest

from psd_jax.data import classnames, datasets, fetch, pipeline, transforms
from psd_jax.data.fashion_mnist import CLASS_NAMES, DEFAULT_PATH, read_idx
from psd_jax.data.tokenizers import ClipTokenizer, SentencePieceTokenizer, train_sentencepiece

VOCAB = fetch.cache_dir() / fetch.CLIP_VOCAB_NAME
SOURCES = fetch.cache_dir() / 'emoji_sources'
needs_vocab = pytest.mark.skipif(
    not VOCAB.exists(), reason=f'CLIP vocabulary absent at {VOCAB}: run '
                               '`python -m psd_jax.data.fetch clip_vocab`')
needs_fashion_mnist = pytest.mark.skipif(
    not pathlib.Path(DEFAULT_PATH).is_dir(),
    reason=f'Fashion-MNIST absent at {DEFAULT_PATH}: `apt-get install dataset-fashion-mnist`')
needs_emoji = pytest.mark.skipif(
    not (SOURCES / '.complete').exists(),
    reason=f'emoji sources absent at {SOURCES}: run `python -m psd_jax.data.fetch emoji`')
OPENMOJI = fetch.cache_dir() / 'openmoji_sources'
needs_openmoji = pytest.mark.skipif(
    not (OPENMOJI / '.complete').exists() or not (SOURCES / '.complete').exists(),
    reason=f'emoji or OpenMoji sources absent ({SOURCES}, {OPENMOJI}): run '
           '`python -m psd_jax.data.fetch emoji openmoji`')


@pytest.fixture(scope='module')
def clip_tokenizer():
    return ClipTokenizer(VOCAB)


@needs_vocab
def test_clip_bpe_ids(clip_tokenizer):
    assert clip_tokenizer('Hello World!')[:6].tolist() == [49406, 3306, 1002, 256, 49407, 0]
    assert clip_tokenizer('a dog')[:5].tolist() == [49406, 320, 1929, 49407, 0]
    assert clip_tokenizer('  A   &amp; DOG ')[:5].tolist() == clip_tokenizer('a & dog')[:5].tolist()
    long = clip_tokenizer(['word ' * 200, 'a dog'])
    assert long.shape == (2, 77) and long.dtype == np.int32
    assert long[0, -1] == 49407 and long[0, 0] == 49406  # truncation keeps end-of-text last


def test_bad_vocabulary_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.txt.gz.*bpe_simple_vocab'):
        ClipTokenizer(tmp_path / 'nowhere.txt.gz')
    bad = tmp_path / 'bad.txt.gz'
    bad.write_bytes(b'not gzip')
    with pytest.raises(ValueError, match='bad.txt.gz'):
        ClipTokenizer(bad)
    short = tmp_path / 'short.txt.gz'
    with gzip.open(short, 'wt') as f:
        f.write('#version\na b\n')
    with pytest.raises(ValueError, match='short.txt.gz does not hold'):
        ClipTokenizer(short)


@pytest.fixture(scope='module')
def emoji_dir():
    """The emoji dataset prepared (once, then reused) in the cache's tfds directory."""
    return str(datasets.prepare('emoji').data_dir_root)


def source(emoji_dir, split='google'):
    return datasets.data_source('emoji', split=split, data_dir=emoji_dir)


@needs_emoji
def test_emoji_dataset_has_both_styles_with_names_and_groups(emoji_dir):
    google, twitter = source(emoji_dir, 'google'), source(emoji_dir, 'twitter')
    assert len(google) == len(twitter) == 1911
    pixels = np.asarray(transforms.decode(google[0]['image']))  # stored PNG bytes
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    captions = {google[i]['caption'] for i in range(0, 1911, 7)}
    assert b'grinning face' in {google[i]['caption'] for i in range(len(google))}
    assert all(c for c in captions)
    labels = np.array([google[i]['label'] for i in range(len(google))])
    assert set(labels) <= set(range(10)) and len(set(labels)) >= 9
    with pytest.raises(ValueError, match=r"split 'apple' does not exist in 'emoji'.*google"):
        source(emoji_dir, 'apple')
    with pytest.raises(FileNotFoundError, match='not prepared in /nonexistent'):
        datasets.data_source('emoji', 'google', '/nonexistent')
    names = datasets.prepare('emoji').info.features['label'].names
    assert list(classnames.EMOJI_GROUPS) == names  # zero-shot names follow the label order


@needs_openmoji
def test_emoji_styles_gives_each_name_two_training_artists_and_a_held_out_third(emoji_dir):
    builder = datasets.prepare('emoji_styles')
    assert builder.info.features['label'].names == list(classnames.EMOJI_GROUPS)
    train = datasets.data_source('emoji_styles', 'train', builder.data_dir_root)
    held = datasets.data_source('emoji_styles', 'openmoji', builder.data_dir_root)
    emoji = {r['key'].decode().split('/')[1]: r for r in source(emoji_dir, 'google')}
    by_key = {r['key'].decode(): r for r in train}
    assert len(held) == len(emoji) == 1911 and len(by_key) == len(train) == 2 * len(held)
    for i in range(0, len(held), 13):  # every held-out name has both training drawings
        drawn = held[i]
        hexcode = drawn['key'].decode().removeprefix('openmoji/')
        google, twitter = by_key[f'google/{hexcode}'], by_key[f'twitter/{hexcode}']
        assert drawn['caption'] == google['caption'] == twitter['caption'] == (
            emoji[hexcode]['caption'])
        assert drawn['label'] == google['label'] == emoji[hexcode]['label']
        assert google['image'] == emoji[hexcode]['image']  # the same PNG bytes
        image = np.asarray(transforms.decode(drawn['image']), np.float32)  # rendered from SVG:
        assert image.shape == (64, 64, 3) and image.std() > 20  # a drawing on white, not the
        google_pixels = np.asarray(transforms.decode(google['image']), np.float32)  # others'
        assert (image[0, 0] == 255).all() and np.abs(image - google_pixels).mean() > 10


def test_the_opencv_advice_is_dropped_and_other_warnings_kept():
    advice = pipeline.NoOpenCvAdvice()
    record = logging.LogRecord('absl', logging.WARNING, 'x.py', 1, 'OpenCV is not installed. '
                               'We recommend using OpenCV', None, None)
    assert not advice.filter(record)
    record.msg = 'split train: skipped 3 records'
    assert advice.filter(record)
    assert any(isinstance(f, pipeline.NoOpenCvAdvice)
               for f in logging.getLogger('absl').filters)


@needs_emoji
@needs_vocab
@pytest.mark.parametrize('workers', [0, 2])
def test_every_example_once_per_epoch_in_a_new_order(emoji_dir, clip_tokenizer, workers):
    """One epoch covers every record exactly once (0 or 2 worker processes); with one reader
    the stream is epoch-aligned, so the second epoch can be checked to be a new order."""
    src = source(emoji_dir)
    epochs = 2 if workers == 0 else 1  # workers interleave their partial last batches
    loader = pipeline.make_loader(src, global_batch=64, image_size=32, tokenizer=clip_tokenizer,
                                  context_length=16, train=True, seed=3, num_epochs=epochs,
                                  worker_count=workers, keep=('key',), drop_remainder=False)
    keys = [k for batch in loader for k in batch['key'].tolist()]
    n = len(src)
    assert len(keys) == epochs * n
    assert len(set(keys[:n])) == n
    if epochs == 2:
        first, second = keys[:n], keys[n:]
        assert sorted(first) == sorted(second) and first != second


@needs_emoji
@needs_vocab
def test_resumed_iterator_yields_the_same_batches(emoji_dir, clip_tokenizer):
    """...also when the resumed loader reads records ahead in threads (data.read_threads):
    how records are read changes neither the batches nor the iterator state."""
    def loader(threads=0, ahead=0):
        return pipeline.make_loader(source(emoji_dir), global_batch=32, image_size=32,
                                    tokenizer=clip_tokenizer, context_length=16, train=True,
                                    seed=5, read_threads=threads, read_ahead=ahead)
    it = iter(loader())
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = iter(loader(threads=4, ahead=64))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got['image'], want['image'])
        np.testing.assert_array_equal(got['text'], want['text'])


@needs_emoji
def test_caption_noise_shuffles_exactly_the_chosen_fraction(emoji_dir):
    src = source(emoji_dir)
    noisy = pipeline.CaptionNoise(src, fraction=0.4, seed=0)
    n = len(src)
    assert noisy.corrupted.size == round(0.4 * n)
    for i in noisy.corrupted[:50]:
        assert noisy[i]['caption'] == src[int(noisy.caption_of[i])]['caption']
        np.testing.assert_array_equal(noisy[i]['image'], src[i]['image'])
    clean = np.setdiff1d(np.arange(n), noisy.corrupted)[:20]
    assert all(noisy[i]['caption'] == src[i]['caption'] for i in clean)
    again = pipeline.CaptionNoise(src, fraction=0.4, seed=0)
    np.testing.assert_array_equal(again.caption_of, noisy.caption_of)
    with pytest.raises(ValueError, match='caption_noise=1.5'):
        pipeline.CaptionNoise(src, fraction=1.5, seed=0)


@needs_emoji
def test_grouped_caption_noise_stays_within_the_group(emoji_dir):
    """'within_group' swaps captions only among records of one subgroup (none keeps its own
    unless its subgroup has a single chosen record); 'group_name' replaces the caption with the
    subgroup's name."""
    src = source(emoji_dir)
    n = len(src)
    subgroup = np.array([int(src[i]['subgroup']) for i in range(n)])
    swapped = pipeline.CaptionNoise(src, fraction=0.4, seed=1, kind='within_group')
    moved = np.flatnonzero(swapped.caption_of != np.arange(n))
    assert 0.3 * n < moved.size <= round(0.4 * n)  # singletons of a subgroup stay put
    np.testing.assert_array_equal(subgroup[swapped.caption_of], subgroup)
    for i in moved[:30]:
        assert swapped[int(i)]['caption'] == src[int(swapped.caption_of[i])]['caption']
    names = src.dataset_info.features['subgroup'].names
    generic = pipeline.CaptionNoise(src, fraction=0.2, seed=1, kind='group_name',
                                    group_names=names)
    assert generic.corrupted.size == round(0.2 * n)
    for i in generic.corrupted[:30]:
        want = names[subgroup[i]].replace('-', ' ')
        assert generic[int(i)]['caption'] == want
    with pytest.raises(ValueError, match='caption_noise_kind'):
        pipeline.CaptionNoise(src, fraction=0.2, seed=1, kind='typo')
    with pytest.raises(ValueError, match="needs the records to have 'colour'"):
        pipeline.CaptionNoise(src, fraction=0.2, seed=1, kind='within_group', group_key='colour')


def test_global_batches_are_the_same_for_any_number_of_hosts(seed):
    """Each host's slice of every global batch, concatenated in host order, is the batch one
    host reads: the same records with the same augmentation RNG, across epoch boundaries."""
    n, batch = 103, 24
    one = pipeline.GlobalBatchSampler(n, batch, seed, host=0, hosts=1)
    for hosts in (2, 3, 4):
        parts = [pipeline.GlobalBatchSampler(n, batch, seed, host=h, hosts=hosts)
                 for h in range(hosts)]
        b = batch // hosts
        for step in range(10):  # ten global batches: more than two epochs of 103 records
            got = [parts[h][step * b + i] for h in range(hosts) for i in range(b)]
            want = [one[step * batch + i] for i in range(batch)]
            assert [m.record_key for m in got] == [m.record_key for m in want]
            assert [m.rng.integers(2**62) for m in got] == [m.rng.integers(2**62) for m in want]
    keys = [one[i].record_key for i in range(2 * n)]
    assert sorted(keys[:n]) == list(range(n)) == sorted(keys[n:])  # every record once per epoch
    assert keys[:n] != keys[n:]  # a new order each epoch
    with pytest.raises(ValueError, match='does not divide across 5 hosts'):
        pipeline.GlobalBatchSampler(n, batch, seed, host=0, hosts=5)


def test_sentencepiece_trained_on_captions():
    captions = ['grinning face', 'smiling face with open mouth', 'red apple', 'green apple',
                'dog face', 'cat face', 'face with tears of joy'] * 10
    tok = SentencePieceTokenizer(train_sentencepiece(captions, vocab_size=60), context_length=12)
    ids = tok(['red dog face', 'apple'])
    assert ids.shape == (2, 12) and ids.dtype == np.int32
    for row in ids:
        n = int(np.sum(row != 0))
        assert n >= 2 and row[n - 1] == tok.eos and not np.any(row[n:])
    assert not np.array_equal(ids[0], ids[1])
    with pytest.raises(FileNotFoundError, match='missing.model'):
        SentencePieceTokenizer('/nonexistent/missing.model')


def test_clip_preprocessing_shapes_and_normalisation(rng):
    image = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    center = transforms.eval_view(image, 32)
    crop = pipeline.random_resized_crop(image, 32, rng)
    assert center.shape == crop.shape == (32, 32, 3)
    white = pipeline.normalize(np.full((2, 2, 3), 255, np.uint8))
    np.testing.assert_allclose(white[0, 0], (1 - pipeline.CLIP_MEAN) / pipeline.CLIP_STD)


@needs_fashion_mnist
def test_fashion_mnist_from_the_debian_package():
    builder = datasets.prepare('fashion_mnist_local')
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        'train': 60000, 'test': 10000}
    assert builder.info.features['label'].names == list(CLASS_NAMES)
    assert classnames.class_names('fashion_mnist_local') == CLASS_NAMES
    test = datasets.data_source('fashion_mnist_local', 'test')
    raw_images = read_idx(pathlib.Path(DEFAULT_PATH) / 't10k-images-idx3-ubyte.gz')
    raw_labels = read_idx(pathlib.Path(DEFAULT_PATH) / 't10k-labels-idx1-ubyte.gz')
    for record in (test[i] for i in range(0, 10000, 997)):
        i = int(record['key'])
        pixels = np.asarray(transforms.decode(record['image']))  # stored bytes, decoded here
        np.testing.assert_array_equal(pixels, raw_images[i])
        assert record['label'] == raw_labels[i]
    assert np.bincount(raw_labels, minlength=10).tolist() == [1000] * 10


@needs_emoji
def test_emoji_captions_with_keywords():
    source = datasets.data_source(
        'emoji/label_keywords', 'google',
        datasets.prepare('emoji', config='label_keywords').data_dir_root)
    captions = [source[i]['caption'].decode() for i in range(len(source))]
    grinning = next(c for c in captions if c.startswith('grinning face,'))
    assert 'happy' in grinning.split(', ')


def test_class_names_and_templates_of_the_projects_sets():
    assert classnames.class_names('emoji/label') == tuple(classnames.EMOJI_GROUPS.values())
    assert all('{}' in t for t in classnames.templates('emoji'))
    assert classnames.templates('my_own_set') == classnames.GENERIC_TEMPLATES
    # the field's sets are not kept here: their lists come from the wheels (evaluation/prompts)
    with pytest.raises(ValueError, match="dataset 'imagenet2012'.*evaluation/prompts.py"):
        classnames.class_names('imagenet2012')


def test_fetch_without_npm_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, 'which', lambda name: None)
    with pytest.raises(RuntimeError, match=r'npm was not found.*npm pack emoji-datasource-google'):
        fetch.emoji_sources(tmp_path)
    with pytest.raises(RuntimeError, match=r'npm was not found.*npm pack openmoji@17'):
        fetch.openmoji_sources(tmp_path)


def test_repeated_slots_repeat_the_previous_batch(seed):
    """repeated_pairs=k (previous-step teacher): the first k slots of batch s > 0 hold the
    records of slots [k, 2k) of batch s - 1 with a fresh augmentation RNG; the other slots walk
    one seeded order (every record once per epoch), and the batches are the same for any host
    count. The sampler's text, which grain stores in checkpoints and compares on resume, keeps
    the name earlier versions wrote (`carried=`), so their checkpoints still resume."""
    n, batch, k = 50, 12, 4
    one = pipeline.GlobalBatchSampler(n, batch, seed, host=0, hosts=1, repeated_pairs=k)
    steps = 30
    keys = np.array([[one[s * batch + i].record_key for i in range(batch)] for s in range(steps)])
    draws = np.array([[one[s * batch + i].rng.integers(2**62) for i in range(batch)]
                      for s in range(steps)])
    np.testing.assert_array_equal(keys[1:, :k], keys[:-1, k:2 * k])
    assert not np.any(draws[1:, :k] == draws[:-1, k:2 * k])  # a new crop for the repeat
    stream = np.concatenate([keys[0]] + [row[k:] for row in keys[1:]])
    assert sorted(stream[:n]) == list(range(n)) == sorted(stream[n:2 * n])
    halves = [pipeline.GlobalBatchSampler(n, batch, seed, host=h, hosts=2, repeated_pairs=k)
              for h in range(2)]
    b = batch // 2
    for s in range(steps):
        assert [halves[h][s * b + i].record_key for h in range(2) for i in range(b)] == \
            keys[s].tolist()
    resumed = pipeline.GlobalBatchSampler(n, batch, seed, host=0, hosts=1, repeated_pairs=k,
                                          start_batch=7)
    assert [resumed[i].record_key for i in range(batch)] == keys[7].tolist()
    with pytest.raises(ValueError, match='half the global batch'):
        pipeline.GlobalBatchSampler(n, batch, seed, host=0, hosts=1, repeated_pairs=7)
    assert repr(one).startswith(f'GlobalBatchSampler(global_batch={batch}, host=0, hosts=1, '
                                f'start_batch=0, carried={k}, order=IndexSampler(')


def test_subset_source_reads_only_the_chosen_records():
    records = [{'x': i} for i in range(10)]
    sub = pipeline.Subset(records, [7, 2, 5])
    assert len(sub) == 3 and [sub[i]['x'] for i in range(3)] == [7, 2, 5]
    with pytest.raises(ValueError, match=r'in \[0, 10\)'):
        pipeline.Subset(records, [3, 10])


def test_wrapped_sources_have_stable_reprs():
    """grain refuses to restore an iterator whose data source's repr changed, so the wrappers'
    reprs must name their configuration, not an object address (else no run resumes)."""
    records = [{'caption': f'caption {i}', 'x': i} for i in range(20)]

    def build(seed):
        return pipeline.WithIndex(pipeline.CaptionNoise(records, fraction=0.5, seed=seed))

    assert repr(build(3)) == repr(build(3)) and ' at 0x' not in repr(build(3))
    assert repr(build(3)) != repr(build(4))
    assert repr(pipeline.Subset(records, [1, 2])) == repr(pipeline.Subset(records, [1, 2]))
    assert repr(pipeline.Subset(records, [1, 2])) != repr(pipeline.Subset(records, [2, 1]))
