"""Evaluators on inputs whose answers are known by construction, plus the Fashion-MNIST linear
probe against a published logistic-regression baseline."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from psd_jax import sharding
from psd_jax.evaluation.embed import embed_batches
from psd_jax.evaluation.linear_probe import linear_probe
from psd_jax.evaluation.retrieval import caption_groups, retrieval_metrics
from psd_jax.evaluation.zero_shot import zero_shot_metrics
from psd_jax.models import build_model

FASHION = pathlib.Path('/usr/share/datasets/fashion-mnist')


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_perfect_and_random_retrieval(rng):
    x = unit(rng.standard_normal((500, 64)))
    perfect = retrieval_metrics(x, x)
    assert perfect['i2t_R@1'] == perfect['t2i_R@1'] == 1.0 and perfect['i2t_median_rank'] == 1
    n = 2000
    chance = retrieval_metrics(unit(rng.standard_normal((n, 64))),
                               unit(rng.standard_normal((n, 64))))
    for k in (1, 5, 10):
        for d in ('i2t', 't2i'):
            expected = k / n
            sigma = np.sqrt(expected * (1 - expected) / n)
            assert abs(chance[f'{d}_R@{k}'] - expected) < 5 * sigma + 1e-9, (d, k)


def test_several_captions_per_image(rng):
    images = unit(rng.standard_normal((100, 32)))
    owner = np.repeat(np.arange(100), 5)
    texts = unit(images[owner] + 0.05 * rng.standard_normal((500, 32)))
    m = retrieval_metrics(images, texts, text_to_image=owner)
    assert m['i2t_R@1'] == 1.0 and m['t2i_R@1'] == 1.0
    # scramble one caption of every image: image -> text still finds one of the other four
    texts[::5] = unit(rng.standard_normal((100, 32)))
    m = retrieval_metrics(images, texts, text_to_image=owner)
    assert m['i2t_R@1'] == 1.0 and m['t2i_R@1'] <= 0.81
    with pytest.raises(ValueError, match='give text_to_image'):
        retrieval_metrics(images, texts)


def test_images_sharing_a_caption_all_count(rng):
    images = unit(rng.standard_normal((4, 16)))
    captions = ['a red apple', 'a red apple', 'a dog', 'a cat']
    texts = images.copy()
    texts[1] = texts[0]  # the same string embeds the same
    plain = retrieval_metrics(images, texts)
    grouped = retrieval_metrics(images, texts, text_group=caption_groups(captions))
    assert plain['t2i_R@1'] < 1.0  # without groups one 'a red apple' query scores a miss
    assert grouped['t2i_R@1'] == 1.0 and grouped['i2t_R@1'] >= plain['i2t_R@1']


def test_zero_shot_on_constructed_classes(rng):
    classes = unit(rng.standard_normal((10, 64)))
    labels = rng.integers(0, 10, 400)
    images = unit(classes[labels] + 0.1 * rng.standard_normal((400, 64)))
    m = zero_shot_metrics(images, labels, classes)
    assert m['top1'] == 1.0 and m['top5'] == 1.0
    shuffled = rng.permutation(10)
    worse = zero_shot_metrics(images, labels, classes[shuffled])
    assert worse['top1'] == pytest.approx(np.mean(shuffled[labels] == labels))
    with pytest.raises(ValueError, match='needs labels'):
        zero_shot_metrics(images, None, classes)
    with pytest.raises(ValueError, match='10 class names'):
        zero_shot_metrics(images, np.where(labels == 9, 12, labels), classes)


@pytest.fixture(scope='module')
def tiny_model():
    model = build_model('tiny')
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                    np.zeros((1, 16), np.int32))
    return model, variables


def batches(images, tokens, size):
    for i in range(0, len(images), size):
        yield {'image': images[i:i + size], 'text': tokens[i:i + size],
               'index': np.arange(i, min(i + size, len(images)))}


def test_padding_and_sharding_do_not_change_embeddings(devices, tiny_model, rng):
    model, variables = tiny_model
    images = rng.integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)  # as the pipeline sends
    tokens = rng.integers(1, 999, (21, 16)).astype(np.int32)
    eight = sharding.make_mesh({'data': 8}, devices)
    one = sharding.make_mesh({'data': 1}, devices[:1])
    a = embed_batches(model, variables, batches(images, tokens, 8), eight, 8)
    b = embed_batches(model, variables, batches(images, tokens, 21), one, 32)
    assert a['image'].shape == (21, 32) and a['index'].tolist() == list(range(21))
    np.testing.assert_allclose(a['image'], b['image'], atol=2e-6)
    np.testing.assert_allclose(a['text'], b['text'], atol=2e-6)
    with pytest.raises(ValueError, match='eval.batch size 12 does not divide'):
        embed_batches(model, variables, batches(images, tokens, 8), eight, 12)


@pytest.mark.skipif(not FASHION.is_dir(), reason='Fashion-MNIST absent: apt-get install '
                                                  'dataset-fashion-mnist')
def test_linear_probe_matches_published_logistic_regression_on_fashion_mnist():
    """Raw pixels: Xiao, Rasul & Vollgraf (2017, arXiv:1708.07747), benchmark of scikit-learn
    classifiers: LogisticRegression (multinomial, L2, C=1) reaches 84.2% test accuracy."""
    from psd_jax.data.fashion_mnist import read_idx

    train_x = read_idx(FASHION / 'train-images-idx3-ubyte.gz').reshape(60000, -1) / 255.0
    train_y = read_idx(FASHION / 'train-labels-idx1-ubyte.gz')
    test_x = read_idx(FASHION / 't10k-images-idx3-ubyte.gz').reshape(10000, -1) / 255.0
    test_y = read_idx(FASHION / 't10k-labels-idx1-ubyte.gz')
    result = linear_probe(train_x, train_y, test_x, test_y, l2_grid=(1e-4, 1e-3), max_iter=150)
    assert abs(result['accuracy'] - 0.842) <= 0.01, result


def test_effective_robustness_against_a_known_logit_line(rng):
    from psd_jax.evaluation import robustness as rb

    slope, intercept = rng.uniform(0.8, 1.2), rng.uniform(-2.0, -0.5)
    imagenet = rng.uniform(0.4, 0.85, 30)
    shift = rb.sigmoid(slope * rb.logit(imagenet) + intercept)
    fitted = rb.fit_logit_linear(imagenet, shift)
    np.testing.assert_allclose(fitted, (slope, intercept), rtol=1e-6)
    on_line = float(rb.sigmoid(slope * rb.logit(0.7) + intercept))
    assert abs(rb.effective_robustness(0.7, on_line, *fitted)) < 1e-9
    assert rb.effective_robustness(0.7, on_line + 0.05, *fitted) == pytest.approx(0.05)
    report = rb.robustness_report({'imagenet2012': 0.7, 'imagenet_v2': on_line + 0.02,
                                   'imagenet_r': on_line + 0.08}, fitted)
    assert report['effective_robustness'] == pytest.approx(0.05)
    with pytest.raises(ValueError, match='imagenet2012'):
        rb.robustness_report({'imagenet_v2': 0.5}, fitted)


def test_testbed_baselines_are_the_least_squares_lines_of_the_standard_models():
    """The shipped testbed table (85 standard ImageNet models) gives each shift's logit-linear
    baseline: checked against an independent normal-equation solve, against the torchvision
    ResNet-50 (a standard model sits on the lines), and against zero-shot CLIP ViT-L/14@336px,
    whose large effective robustness is the CLIP paper's headline (Radford et al. 2021, Fig. 13:
    ImageNet 76.2, V2 70.1, R 88.9, Sketch 60.2, A 77.1, ObjectNet 72.3)."""
    from psd_jax.evaluation import robustness as rb

    table = rb.read_testbed()
    assert len(table['model']) == 85
    lines = rb.testbed_baselines()
    for shift in rb.SHIFTS:
        keep = np.isfinite(table[shift]) & (table[shift] > 0)
        x, y = rb.logit(table['imagenet2012'][keep]), rb.logit(table[shift][keep])
        design = np.stack([x, np.ones_like(x)], axis=1)
        want = np.linalg.solve(design.T @ design, design.T @ y)
        np.testing.assert_allclose(lines[shift], want, rtol=1e-9, err_msg=shift)
        residual = y - (want[0] * x + want[1])
        assert abs(residual.mean()) < 1e-9  # least squares with an intercept: zero mean
    resnet50 = {k: float(table[k][table['model'] == 'resnet50'][0])
                for k in ('imagenet2012', 'imagenet_v2', 'imagenet_r', 'imagenet_sketch')}
    report = rb.robustness_report(resnet50)
    assert abs(report['effective_robustness']) < 0.02, report
    clip = {'imagenet2012': 0.762, 'imagenet_v2': 0.701, 'imagenet_r': 0.889,
            'imagenet_sketch': 0.602, 'imagenet_a': 0.771, 'objectnet': 0.723}
    report = rb.robustness_report(clip)
    assert report['effective_robustness'] > 0.3, report
    assert all(report[f'effective_robustness/{k}'] > 0 for k in rb.SHIFTS)
    assert report['effective_robustness'] == pytest.approx(np.mean(
        [report[f'effective_robustness/{k}'] for k in rb.SHIFTS]))
    with pytest.raises(ValueError, match='imagenet_c'):
        rb.robustness_report({'imagenet2012': 0.7, 'imagenet_c': 0.4})
    with pytest.raises(ValueError, match='fraction'):
        rb.robustness_report({'imagenet2012': 76.2, 'imagenet_v2': 70.1})
