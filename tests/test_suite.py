"""The benchmark suite on real data: emoji (zero-shot), emoji_styles (retrieval), Fashion-MNIST
(zero-shot and linear probe), against the single evaluators run alone; each split embedded
once; the table and JSON; the catalog's tfds datasets through tfds.testing.mock_data; several
captions per image. (The field's names and templates: tests/test_zero_shot_metadata.py.)"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from psd_jax import config as config_lib, sharding
from psd_jax.data import fetch
from psd_jax.data.from_config import make_tokenizer
from psd_jax.evaluation import benchmarks, prompts, run as evaluation, suite as suite_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = fetch.cache_dir()
HAVE_DATA = (CACHE / 'emoji_sources' / '.complete').exists() and (
    CACHE / 'openmoji_sources' / '.complete').exists() and pathlib.Path(
    '/usr/share/datasets/fashion-mnist').is_dir()
HAVE_METADATA = (CACHE / fetch.METADATA_NAME).is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason='emoji / openmoji / Fashion-MNIST absent: '
                                'run `python -m psd_jax.data.fetch` and apt-get install '
                                'dataset-fashion-mnist')
needs_metadata = pytest.mark.skipif(not HAVE_METADATA, reason='zero-shot metadata absent: run '
                                    '`python -m psd_jax.data.fetch zero_shot_metadata`')


def tiny_config(**eval_keys):
    from configs.tiny_test import get_config
    config = get_config()
    config.eval.probe_examples = 1000
    config.eval.evaluators = ()
    for key, value in eval_keys.items():
        setattr(config.eval, key, value)
    return config


@pytest.fixture(scope='module')
def model_state():
    """A tiny dual encoder, freshly initialised (any weights do: every number below is
    compared with another path to the same number), on 8 devices."""
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh.to_dict())
    setup = config_lib.step_setup(config, mesh)
    from psd_jax.training import batch as batch_lib
    inputs = batch_lib.input_spec(setup.model, 1)
    variables = setup.model.init(jax.random.key(1),
                                 *(jax.numpy.zeros(inputs[k].shape, inputs[k].dtype)
                                   for k in ('image', 'text')))
    variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    return setup.model, variables, mesh, make_tokenizer(config)


@pytest.fixture(scope='module')
def demo_suite(model_state, tmp_path_factory):
    """The demo suite, run once, with the embedding and classifier calls counted."""
    model, variables, mesh, tokenizer = model_state
    config = tiny_config(suite='demo', evaluators=('retrieval', 'zero_shot'))
    calls = {'embed': [], 'classes': 0}
    real_embed, real_classes = suite_lib.embed_batches, suite_lib.class_embeddings

    def counted_embed(*args, **kwargs):
        calls['embed'].append(kwargs.get('num_batches'))
        return real_embed(*args, **kwargs)

    def counted_classes(*args, **kwargs):
        calls['classes'] += 1
        return real_classes(*args, **kwargs)

    suite_lib.embed_batches, suite_lib.class_embeddings = counted_embed, counted_classes
    try:
        out = tmp_path_factory.mktemp('suite')
        flat = evaluation.run_evaluators(config, model, variables, mesh, tokenizer,
                                         report_dir=out, step=7)
    finally:
        suite_lib.embed_batches, suite_lib.class_embeddings = real_embed, real_classes
    return flat, out, calls


def single(model_state, task, **data):
    """A single evaluator, alone (its own cache), on the training dataset `data` names."""
    model, variables, mesh, tokenizer = model_state
    config = tiny_config()
    for key, value in data.items():
        section, name = key.split('__')
        setattr(getattr(config, section), name, value)
    return evaluation.EVALUATORS[task](config, model, variables, mesh, tokenizer)


@needs_data
@needs_metadata
def test_suite_equals_the_single_evaluators(demo_suite, model_state):
    flat, _, _ = demo_suite
    emoji = single(model_state, 'zero_shot', data__dataset='emoji', eval__split='twitter')
    styles = single(model_state, 'retrieval', data__dataset='emoji_styles',
                    data__builder_config='', eval__split='openmoji')
    fashion = single(model_state, 'zero_shot', data__dataset='fashion_mnist_local',
                     data__builder_config='', eval__split='test')
    probe = single(model_state, 'linear_probe', eval__probe_dataset='fashion_mnist_local')
    for name, alone in (('emoji', emoji), ('emoji_styles', styles), ('fashion_mnist', fashion),
                        ('fashion_mnist_probe', probe)):
        for metric, value in alone.items():
            assert flat[f'eval/{name}/{metric}'] == pytest.approx(value, abs=1e-7), (name, metric)
    # the training-data evaluators of the same run agree with the suite's emoji entry
    assert flat['eval/zero_shot/top1'] == flat['eval/emoji/top1']
    headlines = [emoji['top1'], styles['mean_R@1'], fashion['top1'], probe['accuracy']]
    assert flat['eval/suite/average'] == pytest.approx(np.mean(headlines), abs=1e-7)


@needs_data
@needs_metadata
def test_each_split_embedded_once(demo_suite):
    _, _, calls = demo_suite
    # emoji twitter (training-data evaluators and the suite's emoji share it), emoji_styles
    # openmoji, Fashion-MNIST test (zero-shot and the probe share it), its training sample
    assert len(calls['embed']) == 4, calls
    assert calls['classes'] == 2  # emoji groups (shared), Fashion-MNIST classes


@needs_data
@needs_metadata
def test_table_and_json(demo_suite):
    flat, out, _ = demo_suite
    table = json.loads((out / 'suite_step_7.json').read_text())
    assert table['step'] == 7 and [b['name'] for b in table['benchmarks']] == list(
        benchmarks.SUITES['demo'])
    assert table['average'] == pytest.approx(flat['eval/suite/average'])
    for row in table['benchmarks']:
        for metric, value in row['metrics'].items():
            assert flat[f'eval/{row["name"]}/{metric}'] == value
    markdown = (out / 'suite_step_7.md').read_text()
    for row in table['benchmarks']:
        assert f'| {row["name"]} | {row["task"]} |' in markdown
        assert f'{100 * row["headline"]:.2f}%' in markdown
    assert f'**{100 * table["average"]:.2f}%**' in markdown
    assert table['robustness'] is None  # no ImageNet in the demo suite


def test_suite_names_are_checked():
    config = tiny_config(suite='demo,imagenet_robustness,cifar100')
    chosen = benchmarks.resolve(config)
    assert list(chosen)[:4] == list(benchmarks.SUITES['demo'])
    assert 'imagenet_r' in chosen and 'cifar100' in chosen
    with pytest.raises(ValueError, match="'cifar1000' is not a suite"):
        benchmarks.resolve(tiny_config(suite='cifar1000'))
    config = tiny_config(suite='mine')
    with config.unlocked():
        config.eval.benchmarks.mine = dict(task='zero_shot', dataset='image_folder_classification',
                                           split='test', path='/data/mine', names='labels_spaces')
    assert benchmarks.resolve(config)['mine'].path == '/data/mine'
    with config.unlocked():
        config.eval.benchmarks.mine = dict(task='zero_shot', dataset='x', split='test',
                                           sample=3)
    with pytest.raises(ValueError, match=r"eval.benchmarks.mine: unknown keys \['sample'\]"):
        benchmarks.resolve(config)
    with config.unlocked():
        config.eval.benchmarks.mine = dict(task='classify', dataset='x', split='test')
    with pytest.raises(ValueError, match=r"mine.task='classify' is not known"):
        benchmarks.resolve(config)


def test_robustness_report_when_imagenet_and_a_shift_are_in_the_suite():
    report = suite_lib.SuiteReport(rows=[
        {'name': n, 'task': 'zero_shot', 'data': n, 'headline_metric': 'top1', 'images': 1,
         'headline': acc, 'metrics': {'top1': acc}}
        for n, acc in (('imagenet1k', 0.6), ('imagenet_v2', 0.52), ('imagenet_r', 0.7))])
    # what Suite.run does at its end, on these rows
    from psd_jax.evaluation import robustness
    expected = robustness.robustness_report(
        {'imagenet2012': 0.6, 'imagenet_v2': 0.52, 'imagenet_r': 0.7})
    report.robustness = expected
    flat = report.flat()
    assert flat['eval/robustness/effective_robustness'] == expected['effective_robustness']
    assert 'Effective robustness' in report.markdown('t')


def split_in_builder_code(builder, split: str) -> bool:
    """Whether the builder's own code makes the split (tfds keeps split sizes in metadata it
    downloads; the split names are in the builder's _split_generators)."""
    import inspect
    source = inspect.getsource(type(builder)._split_generators)
    base = split.split('[')[0]
    return any(t in source for t in (f"'{base}'", f'"{base}"', f'Split.{base.upper()}'))


@needs_metadata
@pytest.mark.parametrize('name', [n for n, b in benchmarks.CATALOG.items()
                                  if b.dataset.split('/')[0] not in
                                  ('emoji', 'emoji_styles', 'fashion_mnist_local')])
def test_catalog_dataset_with_mock_data(name, monkeypatch):
    """Each catalog benchmark's tfds dataset exists with that config, makes that split, yields
    images and labels through the input pipeline, and its label count equals its class
    names'."""
    import tensorflow_datasets as tfds

    from psd_jax.data import datasets, pipeline
    from psd_jax.evaluation.suite import _features, label_names
    bench = benchmarks.CATALOG[name]
    builder = tfds.builder(bench.dataset)  # a wrong name or config raises here
    assert split_in_builder_code(builder, bench.split), bench.split
    assert not split_in_builder_code(builder, 'no_such_split')  # the check can fail
    features = dict(builder.info.features)
    key = bench.multilabel or 'label'
    names, templates, mapping = prompts.classifier_labels(bench, label_names(features, bench))
    assert templates and all('{}' in t for t in templates)
    count = len(label_names(features, bench))
    expected = 200 if bench.names == 'imagenet_subset' else count
    assert len(names) == expected, (name, len(names), count)
    if mapping is not None:
        assert (mapping >= 0).sum() == 200
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        monkeypatch.setattr(datasets, 'data_source',
                            lambda n, split, data_dir=None: tfds.data_source(n, split=split))
        source = suite_lib.Suite(tiny_config(), None, None, None, None).source(bench,
                                                                               bench.split)
        assert key in _features(source)
        record = pipeline.Preprocess(image_size=32, tokenizer=lambda t, n: np.zeros(n, np.int32),
                                     context_length=4, train=False).random_map(
            dict(source[0], caption=''), np.random.default_rng(0))
        assert record['image'].shape == (32, 32, 3) and record['image'].dtype == np.uint8


def test_multilabel_accuracy_counts_a_prediction_in_the_set(rng):
    classes = rng.standard_normal((5, 8))
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    truth = rng.integers(0, 5, 40)
    images = classes[truth] + 0.01 * rng.standard_normal((40, 8))
    sets = [[int(t)] if i % 3 else [int(t), (int(t) + 1) % 5] for i, t in enumerate(truth)]
    sets[0] = []  # no ReaL label: left out
    sets[1] = [(int(truth[1]) + 2) % 5]  # the prediction is not in the set
    source = [{'real_label': np.asarray(s, np.int64)} for s in sets]
    result, scored = suite_lib.multilabel_accuracy(images, classes, source, 'real_label')
    assert scored == 39 and result['top1'] == pytest.approx(38 / 39)


@needs_metadata
def test_catalog_zero_shot_end_to_end_on_mock_data(model_state, monkeypatch):
    """CIFAR-100, Oxford pets and ImageNet-ReaL through Suite.zero_shot on mocked tfds data:
    the classifier has the metadata's classes, accuracies are fractions of the images, ReaL
    scores the images with a label set."""
    import tensorflow_datasets as tfds

    from psd_jax.data import datasets
    model, variables, mesh, tokenizer = model_state
    config = tiny_config(suite='cifar100,pets,imagenet_real')
    real = prompts.templates
    monkeypatch.setattr(prompts, 'templates',  # one template: 1,000 ImageNet prompts, not 80,000
                        lambda bench: real(bench)[:1] if 'imagenet' in bench.dataset
                        else real(bench))
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        monkeypatch.setattr(datasets, 'data_source',
                            lambda n, split, data_dir=None: tfds.data_source(n, split=split))
        report = suite_lib.Suite(config, model, variables, mesh, tokenizer).run(
            benchmarks.resolve(config))
        sets = tfds.data_source('imagenet2012_real', split='validation')
        scored = sum(len(sets[i]['real_label']) > 0 for i in range(len(sets)))
    assert not report.errors, report.errors
    assert [r['name'] for r in report.rows] == ['cifar100', 'pets', 'imagenet_real']
    assert report.rows[2]['images'] == scored
    for row in report.rows[:2]:
        assert row['images'] == 16 and 0 <= row['headline'] <= 1
        assert row['metrics']['top1'] * 16 == pytest.approx(round(row['metrics']['top1'] * 16))


@needs_data
@needs_metadata
def test_retrieval_with_several_captions_per_image(model_state, tmp_path):
    """COCO / Flickr30k style: each image's KEY.txt holds several captions, one per line
    (here real emoji art with its name and its keywords, one per line). The suite's numbers
    equal retrieval computed from the model applied directly to the open_clip view of each
    image and to each line's tokens."""
    import io
    import tarfile

    from psd_jax.data import transforms
    from psd_jax.data.emoji import load_metadata
    from psd_jax.evaluation.retrieval import caption_groups, retrieval_metrics
    model, variables, mesh, tokenizer = model_state
    sources = CACHE / 'emoji_sources'
    entries = [e for e in load_metadata(sources)[0] if len(e['keywords']) >= 2][:48]
    folder = sources / 'emoji-datasource-twitter' / 'package' / 'img' / 'twitter' / '64'
    root = tmp_path / 'shards' / 'test'
    root.mkdir(parents=True)
    images, lines_of = [], []
    with tarfile.open(root / '00000.tar', 'w') as tar:
        for i, e in enumerate(entries):
            lines = [e['label']] + e['keywords'][:2]
            for suffix, data in (('.png', (folder / e['image']).read_bytes()),
                                 ('.txt', '\n'.join(lines).encode())):
                info = tarfile.TarInfo(f'{i:04d}{suffix}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            images.append(transforms.eval_view((folder / e['image']).read_bytes(), 32))
            lines_of.append(lines)
    config = tiny_config(suite='lines')
    with config.unlocked():
        config.eval.benchmarks.lines = dict(
            task='retrieval', dataset='image_text_shards', builder_config='emoji_lines',
            path=str(tmp_path / 'shards'), split='test', caption_lines=True)
        config.data.data_dir = str(tmp_path / 'tfds')
    report = suite_lib.Suite(config, model, variables, mesh, tokenizer).run(
        benchmarks.resolve(config))
    assert not report.errors, report.errors
    got = report.rows[0]['metrics']
    # the same numbers, straight from the model
    params = {'params': variables['params']}
    image_emb = np.asarray(model.apply(params, np.stack(images), method=model.encode_image))
    captions = [line for lines in lines_of for line in lines]
    owner = np.repeat(np.arange(len(entries)), [len(lines) for lines in lines_of])
    text_emb = np.asarray(model.apply(params, np.asarray(tokenizer(captions, 16)),
                                      method=model.encode_text))
    want = retrieval_metrics(image_emb, text_emb, text_to_image=owner,
                             text_group=caption_groups(captions))
    assert report.rows[0]['images'] == len(entries) and len(captions) == 3 * len(entries)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_suite_flag_replaces_the_evaluators():
    """`python -m psd_jax.evaluate --suite NAME` evaluates that suite alone."""
    config = tiny_config(suite='', evaluators=('retrieval',))
    same = evaluation.suite_only(config, None)
    assert same.eval.evaluators == ('retrieval',) and same.eval.suite == ''
    only = evaluation.suite_only(config, 'demo,cifar10')
    assert only.eval.evaluators == () and only.eval.suite == 'demo,cifar10'
