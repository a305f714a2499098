"""Every config in configs/ (sub-folders included, every named variant) loads, validates and
builds its train-step setup; its model's parameter count is pinned (shapes only, no memory)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from psd_jax.training import batch as batch_lib
from psd_jax import config as config_lib, losses, sharding
from psd_jax.training import step

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / 'configs').rglob('*.py'))

# Trainable parameters of each config's model. The paper-scale ones are OpenAI CLIP's published
# counts (ViT-B/32 151,277,313; ViT-B/16 149,620,737; RN50 102,007,137); the tiny model is ours.
TINY = 1_641_345
PARAMETERS = {
    'clip_cc3m_vitb32': 151_277_313,
    'demo': TINY,
    'experiments/psd_vs_clip:emoji': TINY,
    'experiments/psd_vs_clip:emoji_styles': TINY,
    'experiments/psd_vs_clip:fashion': TINY,
    'psd_cc12m_vitb16': 149_620_737,
    'psd_cc3m_vitb32': 151_277_313,
    'psd_yfcc15m_rn50': 102_007_137,
    'tiny_test': TINY,
}


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_cases():
    """(name, path, variant): one per config, or per value its get_config(arg) accepts."""
    cases = []
    for path in CONFIGS:
        name = str(path.relative_to(ROOT / 'configs').with_suffix(''))
        variants = getattr(load(path), 'DATASETS', None)
        if variants:
            cases += [(f'{name}:{v}', path, v) for v in variants]
        else:
            cases.append((name, path, None))
    return cases


CASES = config_cases()


def test_every_config_has_a_pinned_parameter_count():
    assert sorted(name for name, _, _ in CASES) == sorted(PARAMETERS)


@pytest.mark.parametrize('name,path,variant', CASES, ids=[c[0] for c in CASES])
def test_config_is_documented_valid_and_builds(devices, name, path, variant):
    module = load(path)
    command = f'python -m psd_jax.main --config configs/{path.relative_to(ROOT / "configs")}'
    assert command in (module.__doc__ or ''), f'the docstring must give the run command {command}'
    config = module.get_config() if variant is None else module.get_config(variant)
    config_lib.validate(config)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    setup = config_lib.step_setup(config, mesh, dataset_size=1000)
    inputs = batch_lib.input_spec(setup.model, 1)
    shapes = jax.eval_shape(setup.model.init, jax.random.key(0), inputs['image'], inputs['text'])
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes['params'])))
    assert count == PARAMETERS[name]
    spec = config_lib.model_spec(config)
    assert (spec.image_size, spec.context_length) == (config.model.image_size,
                                                      config.model.context_length)
    if config.model.image_size == 224:  # paper scale: CLIP's context and bfloat16 compute
        assert config.model.context_length == 77 and config.model.dtype == 'bfloat16'
        assert config.data.dataset == 'image_text_shards' and config.data.global_batch >= 4096
        # FSDP that shards: on these 8 devices the fsdp axis has all of them, and nearly
        # every parameter (and its optimizer moments and EMA copy) is split over it
        assert mesh.shape['fsdp'] == 8 and config.param_sharding == 'fsdp'
        shardings = step.state_shardings(setup, config.param_sharding)
        abstract = step.abstract_state(setup, shardings)
        for tree in (abstract.params, optax.tree_utils.tree_get(abstract.opt_state, 'mu'),
                     abstract.ema_params):
            if tree is None:
                continue
            split = sum(math.prod(x.shape) for x in jax.tree.leaves(tree)
                        if 'fsdp' in str(x.sharding.spec))
            assert split / sum(math.prod(x.shape) for x in jax.tree.leaves(tree)) > 0.95


def test_base_config_holds_the_loss_defaults_once():
    """config.loss.psd is exactly losses.LossConfig's fields and defaults, which are the
    setting the sweep chose; the demo changes none of them."""
    base = config_lib.base_config()
    fields = {f.name: f.default for f in dataclasses.fields(losses.LossConfig)}
    assert fields.pop('kind') == base.loss.kind == 'psd'
    assert (fields.pop('impl'), fields.pop('tile'), fields.pop('precision')) == (
        base.loss.impl, base.loss.tile, base.loss.precision)
    assert base.loss.psd.to_dict() == fields
    assert (fields['teacher'], fields['teacher_temperature'], fields['ema_momentum'],
            fields['subset_fraction']) == ('ema', 2.0, 0.99, 0.5)
    assert (base.loss.alpha_schedule, base.loss.alpha_max) == ('linear', 0.5)
    demo = load(ROOT / 'configs' / 'demo.py').get_config()
    assert demo.loss.to_dict() == base.loss.to_dict()


def test_the_loss_functions_have_no_defaults_of_their_own():
    """The loss knobs are LossConfig's alone: the loss functions take a config without a
    default and none of its fields as parameters, so no second default can drift from it."""
    # psd_loss's `teacher` is the teacher's embeddings (arrays), not LossConfig.teacher's kind
    knobs = {f.name for f in dataclasses.fields(losses.LossConfig)} - {'teacher'}
    for fn in (losses.psd_loss, losses.clip_loss, losses.sigmoid_loss):
        parameters = inspect.signature(fn).parameters
        assert parameters['config'].default is inspect.Parameter.empty, fn.__name__
        assert not knobs & set(parameters), (fn.__name__, knobs & set(parameters))
    with pytest.raises(ValueError, match=r"loss keys \['tiles'\] are not known"):
        losses.LossConfig.from_mapping('clip', tiles=4)


def test_locked_config_names_the_nearest_key():
    config = config_lib.base_config()
    config.lock()
    with pytest.raises(AttributeError, match='Did you mean "lr"'):
        config.optim.lrr = 0.1
    config.loss.psd.teacher = 'same_pass'
    config.loss.psd.teacher_temperature = 1.0
    with pytest.raises(ValueError, match='degenerate'):
        config_lib.validate(config)
    config.loss.psd.teacher = 'momentum'
    with pytest.raises(ValueError, match=r"psd.teacher='momentum' is not known; allowed: \["):
        config_lib.validate(config)


@pytest.mark.parametrize('threads,ahead', [(-1, 0), (4, 2)])
def test_read_ahead_settings_are_checked(threads, ahead):
    config = config_lib.base_config()
    config.data.read_threads, config.data.read_ahead = threads, ahead
    with pytest.raises(ValueError, match=r'data.read_threads: .*need 0 <= read_threads <= '
                                         'read_ahead'):
        config_lib.validate(config)


def test_the_loss_defaults_are_written_once():
    """The base config's loss keys are LossConfig's defaults, not copies that could drift: the
    loss functions have none of their own (they take a LossConfig), and changing a LossConfig
    default changes the config."""
    assert config_lib.loss_config(config_lib.base_config()) == losses.LossConfig()
    signatures = [inspect.signature(f) for f in (losses.psd_loss, losses.clip_loss,
                                                 losses.sigmoid_loss)]
    for signature in signatures:
        assert not {'impl', 'tile', 'precision', 'soft_weight'} & set(signature.parameters)
        assert signature.parameters['config'].default is inspect.Parameter.empty


def test_the_global_batch_is_checked_in_one_place_before_anything_is_built(devices):
    """config.check_global_batch, which step_setup (and so every entry point) runs: the batch
    must split over the data axes and into train.micro_batches per shard, with BatchNorm
    refusing accumulation; each refusal names its key. A batch that fits passes."""
    mesh = sharding.make_mesh({'data': 4, 'fsdp': 2}, devices)
    config = config_lib.base_config()
    config.data.global_batch, config.train.micro_batches = 48, 2
    config_lib.check_global_batch(config, mesh)  # 48 / 8 = 6 per shard, 2 micro-batches of 3
    config.data.global_batch = 44
    with pytest.raises(ValueError, match=r'config.data.global_batch size 44 does not divide '
                                         r'across the data axes'):
        config_lib.step_setup(config, mesh)
    config.data.global_batch, config.train.micro_batches = 48, 4
    with pytest.raises(ValueError, match=r'train.micro_batches=4 must divide the per-shard '
                                         r'batch 6 .*\[1, 2, 3, 6\]'):
        config_lib.step_setup(config, mesh)
    config.model.preset, config.train.micro_batches = 'RN50', 2
    with pytest.raises(ValueError, match='BatchNorm'):
        config_lib.check_global_batch(config, mesh)
