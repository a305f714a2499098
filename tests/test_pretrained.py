"""Pretrained weights in and out (psd_jax/models/convert.py, psd_jax/pretrained.py): open_clip
models imported reproduce open_clip's outputs (a committed golden fixture made by
scripts/make_open_clip_fixture.py, so neither torch nor open_clip is needed here), export and
import invert each other exactly, bad state dicts are refused by name, the tokenizer matches
open_clip's, and training, evaluation and export run from and to such weights."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from psd_jax import config as config_lib, pretrained, sharding
from psd_jax.training import step
from psd_jax.data import fetch
from psd_jax.data.tokenizers import ClipTokenizer
from psd_jax.models import build_model, convert
from psd_jax.persistence.saved_run import run_config
from test_train import CONFIG, FAST, env, pytestmark as needs_emoji, restored_params

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'open_clip'
OUTPUTS = np.load(FIXTURE / 'outputs.npz')
# unit-norm features; measured: 1.5e-7 / 3.9e-7 (ViT image / text), 1.6e-7 / 2.7e-7 (ResNet)
TOLERANCE = {'vit': 1e-5, 'rn': 1e-5}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize('name', ['vit', 'rn'])
def test_imported_open_clip_models_give_open_clip_outputs(name):
    variables, spec = pretrained.load(FIXTURE / name)
    assert spec.act == ('quick_gelu' if name == 'vit' else 'gelu')  # from open_clip_config.json
    model = build_model(spec)
    used = {k: v for k, v in variables.items() if v}
    images = model.apply(used, jnp.asarray(OUTPUTS[f'{name}_images']), method=model.encode_image)
    texts = model.apply(used, jnp.asarray(OUTPUTS[f'{name}_texts']), method=model.encode_text)
    np.testing.assert_allclose(images, unit(OUTPUTS[f'{name}_image_features']), rtol=0,
                               atol=TOLERANCE[name])
    np.testing.assert_allclose(texts, unit(OUTPUTS[f'{name}_text_features']), rtol=0,
                               atol=TOLERANCE[name])
    assert float(variables['params']['logit_scale']) == float(OUTPUTS[f'{name}_logit_scale'])


@pytest.mark.parametrize('name', ['vit', 'rn'])
def test_export_inverts_import_exactly(name):
    state_dict = load_file(str(FIXTURE / name / pretrained.WEIGHTS_NAME))
    variables, spec = pretrained.load(FIXTURE / name)
    back = convert.export_state_dict(variables, spec)
    assert set(back) == {k for k in state_dict if not convert.IGNORED.match(k)}
    for key, value in back.items():
        assert value.shape == state_dict[key].shape, key
        np.testing.assert_array_equal(value, state_dict[key].astype(np.float32), err_msg=key)


def test_a_psd_jax_model_survives_export_and_import(tmp_path, devices):
    config = config_lib.base_config()
    mesh = sharding.make_mesh({'data': 1}, devices[:1])
    setup = config_lib.step_setup(config, mesh)
    state = step.init_state(setup, jax.random.key(1))
    variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
    folder = pretrained.write_open_clip(tmp_path / 'exported', variables,
                                        config_lib.model_spec(config))
    again = pretrained.for_config(config, str(folder))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(variables['params']),
                            jax.tree.leaves(again['params'])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def damaged(tmp_path, change) -> pathlib.Path:
    """The ViT fixture with `change` applied to its state dict, saved with its config."""
    state_dict = dict(load_file(str(FIXTURE / 'vit' / pretrained.WEIGHTS_NAME)))
    change(state_dict)
    path = tmp_path / 'weights.safetensors'
    save_file(state_dict, str(path))
    config = (FIXTURE / 'vit' / pretrained.CONFIG_NAME).read_text()
    (tmp_path / pretrained.CONFIG_NAME).write_text(config)
    return path


@pytest.mark.parametrize('change,message', [
    (lambda sd: sd.pop('visual.transformer.resblocks.1.mlp.c_fc.bias'),
     r"missing \['visual.transformer.resblocks.1.mlp.c_fc.bias'\]"),
    (lambda sd: sd.update({'visual.extra.weight': np.zeros(3, np.float16)}),
     r"unexpected \['visual.extra.weight'\]"),
    (lambda sd: sd.update({'transformer.resblocks.0.attn.in_proj_bias':
                           np.zeros(95, np.float16)}),
     "'transformer.resblocks.0.attn.in_proj_bias': shape"),
    (lambda sd: sd.pop('token_embedding.weight'), "not a CLIP state dict: no 'token_embedding"),
])
def test_a_state_dict_that_does_not_fit_is_refused_naming_the_tensor(tmp_path, change, message):
    path = damaged(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        pretrained.load(path, act='quick_gelu')


def test_weights_that_do_not_fit_the_config_are_refused_naming_the_fields(tmp_path):
    config = config_lib.base_config()
    config.model.init_from = str(FIXTURE / 'vit')
    pretrained.for_config(config)  # the tiny preset at CLIP's vocabulary: fits
    config.model.act = 'gelu'
    with pytest.raises(ValueError, match=r"activation 'quick_gelu' \(its open_clip_config"):
        pretrained.for_config(config)
    config.model.act, config.model.context_length = '', 77
    with pytest.raises(ValueError, match=r'context_length: 16 in the weights, 77 in the config'):
        pretrained.for_config(config)
    bare = tmp_path / 'bare'
    bare.mkdir()
    save_file(load_file(str(FIXTURE / 'vit' / pretrained.WEIGHTS_NAME)),
              str(bare / 'weights.safetensors'))
    with pytest.raises(ValueError, match='nothing says which activation'):
        pretrained.load(bare / 'weights.safetensors')
    with pytest.raises(ValueError, match='no config gives the attention heads'):
        pretrained.load(bare / 'weights.safetensors', act='quick_gelu')
    (tmp_path / 'weights.npz').write_bytes(b'')
    with pytest.raises(ValueError, match=r"unknown weights format '.npz'"):
        pretrained.read(tmp_path / 'weights.npz')
    with pytest.raises(FileNotFoundError, match='no such file or folder'):
        pretrained.read(tmp_path / 'absent.safetensors')


@pytest.mark.skipif(not (fetch.cache_dir() / fetch.CLIP_VOCAB_NAME).exists(),
                    reason='CLIP vocabulary absent: run `python -m psd_jax.data.fetch clip_vocab`')
def test_the_tokenizer_matches_open_clip():
    """open_clip 3.3's tokenisation of captions that need ftfy's fixing (curly quotes,
    ligatures, full-width text, mojibake), HTML entities and its special-token names."""
    reference = json.loads((FIXTURE / 'tokens.json').read_text())
    tokenizer = ClipTokenizer(fetch.cache_dir() / fetch.CLIP_VOCAB_NAME, 77)
    got = tokenizer(reference['captions'])
    for caption, want, row in zip(reference['captions'], reference['tokens'], got):
        assert row.tolist() == want, caption


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True,
                          timeout=timeout)


@needs_emoji
def test_train_from_imported_weights_export_and_evaluate_the_export(tmp_path, devices):
    """A tiny run starts from the fixture's weights (logged; two steps move them only a
    little); its checkpoint exports (from the run's own config) to an open_clip folder, files
    readable as the folder is, that imports to the same parameters,
    and evaluating that folder (psd_jax.evaluate --init_from, no training) gives the run's own
    final retrieval numbers."""
    workdir, out = tmp_path / 'run', tmp_path / 'exported'
    retrieval = "--config.eval.evaluators=('retrieval',)"
    trained = run('-m', 'psd_jax.main', f'--config={CONFIG}', f'--workdir={workdir}', *FAST,
                  retrieval, f'--config.model.init_from={FIXTURE / "vit"}',
                  '--config.train.steps=2', '--config.train.checkpoint_every=2',
                  '--config.optim.lr=1e-4')
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f'parameters from {FIXTURE / "vit"}' in trained.stderr
    params, _ = restored_params(workdir, {'data': 8}, devices, step_number=2)
    start = pretrained.load(FIXTURE / 'vit')[0]['params']
    fresh = step.init_state(config_lib.step_setup(config_lib.base_config(), sharding.make_mesh(
        {'data': 1}, devices[:1])), jax.random.key(0)).params
    moved = np.mean([np.abs(a - b).mean() for a, b in zip(jax.tree.leaves(params),
                                                           jax.tree.leaves(start))])
    apart = np.mean([np.abs(np.asarray(a) - b).mean() for a, b in zip(jax.tree.leaves(fresh),
                                                                       jax.tree.leaves(start))])
    assert moved < 0.05 * apart, (moved, apart)
    # export reads the run's own config.json: no --config, no repeated --config.model.* flags;
    # a --config that disagrees on the model is refused in one line naming the key
    disagreeing = config_lib.base_config()
    disagreeing.model.embed_dim = 48
    with pytest.raises(ValueError) as refused:
        run_config(str(workdir), disagreeing)
    assert '\n' not in str(refused.value) and 'at model.embed_dim: 48 given, 0 in the run' in (
        str(refused.value))
    exported = run('-m', 'psd_jax.export', f'--workdir={workdir}', f'--out={out}')
    assert exported.returncode == 0, exported.stderr[-3000:]
    for name in (pretrained.WEIGHTS_NAME, pretrained.CONFIG_NAME):  # readable as the folder is
        assert (out / name).stat().st_mode & 0o044 == out.stat().st_mode & 0o044, name
    again = pretrained.load(out)[0]['params']
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    evaluated = run('-m', 'psd_jax.evaluate', f'--config={CONFIG}', f'--init_from={out}',
                    f'--workdir={tmp_path / "eval"}', retrieval)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    got = json.loads((tmp_path / 'eval' / 'eval_pretrained.json').read_text())
    want = json.loads((workdir / 'final_metrics.json').read_text())
    keys = [k for k in want if k.startswith('eval/retrieval/')]
    assert keys and {k: got[k] for k in keys} == pytest.approx({k: want[k] for k in keys},
                                                               abs=1e-6)


@pytest.mark.skipif(not (importlib.util.find_spec('torch') and importlib.util.find_spec(
    'open_clip')), reason='torch and open_clip are not installed (optional: the golden fixture '
                          'covers the conversion without them)')
def test_a_live_open_clip_model_converts_and_loads_back(tmp_path):
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model('ViT-B-32-quickgelu').eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn_like(tensor))
    torch_path = tmp_path / 'model.bin'
    torch.save(model.state_dict(), torch_path)
    variables, spec = pretrained.load(torch_path, act='quick_gelu', heads=(12, 8))
    assert convert.preset_name(spec) == 'ViT-B/32'
    tokens = open_clip.get_tokenizer('ViT-B-32')(['a photo of a cat', 'a dog'])
    with torch.no_grad():
        want = model.encode_text(tokens, normalize=True).numpy()
    psd = build_model(spec)
    got = psd.apply({'params': variables['params']}, jnp.asarray(tokens.numpy(), jnp.int32),
                    method=psd.encode_text)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    mean, std = np.array(open_clip.OPENAI_DATASET_MEAN), np.array(open_clip.OPENAI_DATASET_STD)
    normalised = torch.from_numpy(((pixels / 255 - mean) / std).astype(np.float32))
    with torch.no_grad():
        want = model.encode_image(normalised.permute(0, 3, 1, 2), normalize=True).numpy()
    got = psd.apply({'params': variables['params']}, jnp.asarray(pixels),
                    method=psd.encode_image)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    folder = pretrained.write_open_clip(tmp_path / 'exported', variables, spec)
    loaded = open_clip.create_model(f'local-dir:{folder}').eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
