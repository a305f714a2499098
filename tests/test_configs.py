"""Every config in configs/ loads, validates and builds its model (shapes only, no memory)."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from psd_jax import config as config_lib
from psd_jax.models import build_model

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'configs').glob('*.py'))


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_documented_valid_and_builds(path):
    module = load(path)
    assert 'python -m psd_jax.main --config configs/' in (module.__doc__ or ''), \
        'the docstring must give the run command'
    config = module.get_config()
    config_lib.validate(config)
    spec = config_lib.model_spec(config)
    model = build_model(spec, config.model.dtype)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3),
                                                 jnp.float32),
                            jax.ShapeDtypeStruct((1, spec.context_length), jnp.int32))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes['params'])))
    assert count > 0
    if config.model.image_size == 224:  # paper scale: CLIP's context and bfloat16 compute
        assert config.model.context_length == 77 and config.model.dtype == 'bfloat16'
        assert config.data.dataset == 'image_text_shards' and config.data.global_batch >= 4096


def test_locked_config_names_the_nearest_key():
    config = config_lib.base_config()
    config.lock()
    with pytest.raises(AttributeError, match='Did you mean "lr"'):
        config.optim.lrr = 0.1
    config.loss.psd.teacher_temperature = 1.0
    with pytest.raises(ValueError, match='degenerate'):
        config_lib.validate(config)
