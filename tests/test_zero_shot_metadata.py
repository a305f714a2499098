"""The field's zero-shot class names and templates (psd_jax/data/wheel_metadata.py,
psd_jax/evaluation/prompts.py): equal to the wheels' own files, extracted without running
them, a missing file named with its fetch command, and (where torch and open_clip are
installed) the classifier equal to open_clip.build_zero_shot_classifier's."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from psd_jax import sharding
from psd_jax.data import fetch
from psd_jax.evaluation import benchmarks, prompts

CACHE = fetch.cache_dir()
needs_metadata = pytest.mark.skipif(not (CACHE / fetch.METADATA_NAME).is_file(),
                                    reason='zero-shot metadata absent: run '
                                    '`python -m psd_jax.data.fetch zero_shot_metadata`')


@needs_metadata
def test_metadata_equals_the_wheels_files():
    """The extracted names and templates against open_clip's module executed as Python (the
    extraction parses it without running it) and CLIP_benchmark's JSON read directly."""
    sources = CACHE / 'zero_shot_sources'
    namespace: dict = {}
    exec((sources / 'open_clip' / 'zero_shot_metadata.py').read_text(), namespace)  # noqa: S102
    names = prompts.classifier_labels(benchmarks.CATALOG['imagenet1k'], None)[0]
    assert names == list(namespace['IMAGENET_CLASSNAMES'])
    assert len(names) == 1000 and 'rooster' in names and 'newt' in names
    templates = prompts.templates(benchmarks.CATALOG['imagenet1k'])
    assert len(templates) == 80
    assert [t.format('X') for t in templates] == [
        f('X') for f in namespace['OPENAI_IMAGENET_TEMPLATES']]
    cb = json.loads((sources / 'clip_benchmark' / 'datasets' /
                     'en_zeroshot_classification_templates.json').read_text())
    cifar = prompts.templates(benchmarks.CATALOG['cifar100'])
    assert [t.format('X') for t in cifar] == [t.replace('{c}', 'X') for t in cb['cifar100']]
    assert len(cifar) == 18
    pets = json.loads((sources / 'clip_benchmark' / 'datasets' / 'en_classnames.json'
                       ).read_text())['pets']
    assert prompts.classifier_labels(benchmarks.CATALOG['pets'], None)[0] == pets


def test_template_extraction_without_running_code():
    from psd_jax.data import wheel_metadata
    source = ("A = ('x',)\nT = (lambda c: f'a {c} with {{braces}}.', lambda c: f'{c}')\n"
              "IMAGENET_CLASSNAMES = tuple(str(i) for i in range(3))\n")
    values = wheel_metadata._assignments(source)
    assert [wheel_metadata._template(t) for t in values['T'].elts] == [
        'a {} with {{braces}}.', '{}']
    assert 'a {} with {{braces}}.'.format('cat') == 'a cat with {braces}.'
    with pytest.raises(ValueError):  # not a literal: refused, never evaluated
        wheel_metadata.open_clip_metadata(source)


def test_missing_metadata_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv('PSD_JAX_CACHE', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='python -m psd_jax.data.fetch zero_shot_metadata'):
        prompts.classifier_labels(benchmarks.CATALOG['imagenet1k'], None)


@needs_metadata
@pytest.mark.skipif(not (importlib.util.find_spec('torch') and importlib.util.find_spec(
    'open_clip')), reason='torch and open_clip are not installed (optional: the metadata test '
                          'above checks the names and templates against the wheel\'s files)')
def test_zero_shot_classifier_equals_open_clips(tmp_path):
    """Same weights, same names and templates: psd_jax's ImageNet classifier equals
    open_clip.build_zero_shot_classifier's within float32 rounding."""
    import open_clip
    import torch

    from psd_jax import pretrained
    from psd_jax.data.tokenizers import ClipTokenizer
    from psd_jax.evaluation.zero_shot import class_embeddings
    from psd_jax.models import build_model
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    bench = benchmarks.CATALOG['imagenet1k']
    names, templates, _ = prompts.classifier_labels(bench, None)
    assert names == list(IMAGENET_CLASSNAMES)
    assert [t.format('x') for t in templates] == [f('x') for f in OPENAI_IMAGENET_TEMPLATES]
    torch.manual_seed(0)
    model = open_clip.create_model('ViT-B-32-quickgelu').eval()
    path = tmp_path / 'model.bin'
    torch.save(model.state_dict(), path)
    chosen = list(np.random.default_rng().choice(1000, 16, replace=False))
    with torch.no_grad():
        want = open_clip.build_zero_shot_classifier(
            model, open_clip.get_tokenizer('ViT-B-32'), [names[i] for i in chosen],
            OPENAI_IMAGENET_TEMPLATES, num_classes_per_batch=4, device='cpu').numpy().T
    variables, spec = pretrained.load(path, act='quick_gelu', heads=(12, 8))
    psd = build_model(spec)
    mesh = sharding.make_mesh({'data': 8})
    got = class_embeddings(psd, {'params': variables['params']},
                           ClipTokenizer(fetch.clip_vocab(), 77), [names[i] for i in chosen],
                           templates, mesh, 256, 77)
    assert got.shape == want.shape == (16, 512)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    print('max abs difference', np.abs(got - want).max())
