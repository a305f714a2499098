"""The importer refuses what it cannot import faithfully, naming why (psd_jax/models/
import_checks.py, psd_jax/pretrained.py): bare weights without an activation or heads, open_clip
configs whose forward psd_jax does not compute, layouts that are not open_clip's CLIP; wrapper
prefixes and mask buffers are stripped (export: tests/test_run_outputs.py)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from psd_jax import config as config_lib, pretrained

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'open_clip'
VIT = FIXTURE / 'vit'


def state_dict() -> dict:
    return dict(load_file(str(VIT / pretrained.WEIGHTS_NAME)))


def folder_with(tmp_path, model_cfg_change=None, weights=None) -> pathlib.Path:
    """The ViT fixture's folder, its model config changed by `model_cfg_change`."""
    folder = tmp_path / 'model'
    folder.mkdir()
    cfg = json.loads((VIT / pretrained.CONFIG_NAME).read_text())
    if model_cfg_change:
        model_cfg_change(cfg['model_cfg'])
    (folder / pretrained.CONFIG_NAME).write_text(json.dumps(cfg))
    save_file(weights if weights is not None else state_dict(),
              str(folder / pretrained.WEIGHTS_NAME))
    return folder


def tiny_config(path, act=''):
    config = config_lib.base_config()
    config.model.init_from = str(path)
    config.model.act = act
    return config


def test_a_bare_gelu_file_without_model_act_is_refused(tmp_path):
    """A LAION / DataComp model downloaded as a bare weights file: nothing says GELU, so the
    import must not default to quick_gelu."""
    bare = tmp_path / 'open_clip_pytorch_model.safetensors'
    save_file(state_dict(), str(bare))
    with pytest.raises(ValueError, match=r"nothing says which activation.*set model.act"):
        pretrained.for_config(tiny_config(bare))
    # with model.act the config gives both the activation and the heads (its preset's)
    imported = pretrained.for_config(tiny_config(bare, act='gelu'))
    folder = pretrained.load(VIT)[0]
    for key in ('image_tower', 'text_tower'):
        np.testing.assert_array_equal(
            imported['params'][key]['transformer']['block0']['attn']['qkv']['kernel'],
            folder['params'][key]['transformer']['block0']['attn']['qkv']['kernel'])


def test_heads_are_never_guessed(tmp_path):
    bare = tmp_path / 'weights.safetensors'
    save_file(state_dict(), str(bare))
    with pytest.raises(ValueError, match='no config gives the attention heads'):
        pretrained.load(bare, act='quick_gelu')
    # the fixture's heads are 2 of width 16: width / 64 would not even divide; given, they hold
    _, spec = pretrained.load(bare, act='quick_gelu', heads=(2, 2))
    assert spec.image['heads'] == 2 and spec.text_heads == 2


@pytest.mark.parametrize('change,message', [
    (lambda c: c['vision_cfg'].update(pool_type='avg'), r"vision_cfg.pool_type='avg' changes"),
    (lambda c: c['vision_cfg'].update(attentional_pool=True), 'vision_cfg.attentional_pool=True'),
    (lambda c: c['vision_cfg'].update(no_ln_pre=True), 'vision_cfg.no_ln_pre=True'),
    (lambda c: c['vision_cfg'].update(final_ln_after_pool=True), 'final_ln_after_pool=True'),
    (lambda c: c['text_cfg'].update(no_causal_mask=True), 'text_cfg.no_causal_mask=True'),
    (lambda c: c['text_cfg'].update(pool_type='eos', eos_id=1), "text_cfg.pool_type='eos'"),
    (lambda c: c['text_cfg'].update(pool_type='last'), "text_cfg.pool_type='last'"),
    (lambda c: c['text_cfg'].update(proj_type='mlp'), "text_cfg.proj_type='mlp'"),
    (lambda c: c['text_cfg'].update(hf_model_name='roberta-base'), 'text_cfg.hf_model_name'),
    (lambda c: c['vision_cfg'].update(timm_model_name='convnext_base'), 'timm_model_name'),
    (lambda c: c.update(custom_text=True), 'custom_text=True'),
    (lambda c: c.update(init_logit_bias=-10), 'init_logit_bias=-10'),
    (lambda c: c['vision_cfg'].update(some_new_field=3), 'some_new_field=3 is a field psd_jax'),
])
def test_open_clip_fields_that_change_the_forward_are_refused(tmp_path, change, message):
    folder = folder_with(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        pretrained.load(folder)


def test_fields_at_the_computed_values_are_accepted(tmp_path):
    def explicit(c):
        c['vision_cfg'].update(pool_type='tok', attentional_pool=False, patch_dropout=0.5,
                               ls_init_value=None, block_type='default')
        c['text_cfg'].update(pool_type='argmax', no_causal_mask=False, eos_id=2, pad_id=0)
    pretrained.load(folder_with(tmp_path, explicit))


@pytest.mark.parametrize('rename,message', [
    (lambda k: k.replace('visual.', 'vision_model.').replace('transformer.', 'text_model.'),
     'Hugging Face transformers CLIP checkpoint'),
    (lambda k: k.replace('visual.transformer.', 'visual.trunk.blocks.'), 'timm image tower'),
    (lambda k: k if k.startswith('visual.') or k == 'logit_scale' else 'text.' + k,
     'CustomTextCLIP layout'),
])
def test_other_layouts_are_named(tmp_path, rename, message):
    weights = {rename(k): v for k, v in state_dict().items()}
    with pytest.raises(ValueError, match=message):
        pretrained.load(folder_with(tmp_path, weights=weights))


def test_a_hugging_face_folder_is_named(tmp_path):
    folder = tmp_path / 'hf'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps({'architectures': ['CLIPModel'],
                                                    'model_type': 'clip'}))
    save_file(state_dict(), str(folder / 'model.safetensors'))
    with pytest.raises(ValueError, match='Hugging Face transformers CLIP folder is not supported'):
        pretrained.load(folder)


def test_compiled_prefixes_and_mask_buffers_are_stripped(tmp_path):
    weights = {f'_orig_mod.{k}': v for k, v in state_dict().items()}
    weights['_orig_mod.attn_mask'] = np.triu(np.full((16, 16), -np.inf, np.float32), 1)
    weights['_orig_mod.visual.transformer.resblocks.0.attn_mask'] = np.zeros((2, 2), np.float32)
    got = pretrained.load(folder_with(tmp_path, weights=weights))[0]
    want = pretrained.load(VIT)[0]
    np.testing.assert_array_equal(got['params']['logit_scale'], want['params']['logit_scale'])
    np.testing.assert_array_equal(
        got['params']['text_tower']['token_embedding']['embedding'],
        want['params']['text_tower']['token_embedding']['embedding'])


@pytest.mark.skipif(not importlib.util.find_spec('torch'),
                    reason='torch is not installed (needed to write .bin files)')
def test_an_ordinary_bin_loads_without_torch_warnings(tmp_path):
    import torch
    path = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict().items()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # any warning (torch.jit.load's deprecation) fails
        variables, _ = pretrained.load(path, act='quick_gelu', heads=(2, 2))
    assert 'logit_scale' in variables['params']


@pytest.mark.skipif(not (importlib.util.find_spec('torch') and importlib.util.find_spec(
    'open_clip')), reason='torch and open_clip are not installed (a scripted model needs both)')
def test_a_scripted_open_clip_model_loads_quietly(tmp_path):
    """A TorchScript archive (the format of OpenAI's releases) with open_clip's attn_mask
    buffer: imported as QuickGELU, the mask ignored, no torch warning."""
    import open_clip
    import torch
    model = open_clip.create_model('ViT-B-32-quickgelu', jit=True).eval()
    path = tmp_path / 'ViT-B-32.pt'
    torch.jit.save(model, str(path))
    assert pretrained.is_torchscript(path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        variables, spec = pretrained.load(path, heads=(12, 8))
    assert spec.act == 'quick_gelu'
    np.testing.assert_array_equal(
        variables['params']['text_tower']['token_embedding']['embedding'],
        model.state_dict()['token_embedding.weight'].numpy())
