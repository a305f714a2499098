"""Model FLOPs (psd_jax/training/flops.py) against a hand count of each matmul, against XLA's cost
analysis on CPU, and the MFU / HFU peaks by compute dtype (TF32 for float32 on NVIDIA GPUs)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

from psd_jax import config as config_lib
from psd_jax.training import flops, mfu
from psd_jax.models import ModelSpec, build_model

VIT = ModelSpec(embed_dim=64, image_size=64, vocab_size=1000, context_length=24,
                text_width=128, text_depth=2, text_heads=2,
                image=dict(kind='vit', patch_size=8, width=128, depth=2, heads=2))
RESNET = ModelSpec(embed_dim=64, image_size=64, vocab_size=1000, context_length=24,
                   text_width=128, text_depth=2, text_heads=2,
                   image=dict(kind='resnet', layers=(1, 1, 1, 1), width=16, heads=2))


def test_vit_and_text_equal_a_hand_count():
    # ViT: 64 / 8 = 8 x 8 = 64 patches + the class token = 65 tokens of width 128.
    patch_embed = 2 * 64 * (8 * 8 * 3) * 128
    per_block = (2 * 65 * 128 * 384      # qkv
                 + 2 * 65 * 65 * 128     # q k^T over the heads
                 + 2 * 65 * 65 * 128     # weights x v
                 + 2 * 65 * 128 * 128    # output projection
                 + 2 * 65 * 128 * 512    # fc
                 + 2 * 65 * 512 * 128)   # proj
    assert flops.image_tower(VIT) == patch_embed + 2 * per_block + 2 * 128 * 64
    text_block = (2 * 24 * 128 * 384 + 2 * 2 * 24 * 24 * 128 + 2 * 24 * 128 * 128
                  + 2 * 2 * 24 * 128 * 512)
    assert flops.text(24, 128, 2, 64) == 2 * text_block + 2 * 128 * 64
    # patch dropout 0.5 keeps 32 of the 64 patches: the transformer sees 33 tokens
    dropped = flops.image_tower(VIT, patch_dropout=0.5)
    assert dropped == patch_embed + flops.transformer(33, 128, 2) + 2 * 128 * 64


def test_resnet_equals_a_hand_count():
    w = 16  # stem at 32 x 32 (stride 2), pooled to 16 x 16
    stem = 2 * 32 * 32 * 9 * (3 * 8 + 8 * 8 + 8 * 16)
    # one bottleneck per stage: 1x1 in->p and 3x3 p->p at the input size, then (after the
    # anti-aliasing pool) 1x1 p->4p and the 1x1 shortcut in->4p at the output size
    blocks = (2 * 16 * 16 * (w * 16 + 9 * 16 * 16) + 2 * 16 * 16 * (16 * 64 + w * 64)   # 16
              + 2 * 16 * 16 * (64 * 32 + 9 * 32 * 32) + 2 * 8 * 8 * (32 * 128 + 64 * 128)
              + 2 * 8 * 8 * (128 * 64 + 9 * 64 * 64) + 2 * 4 * 4 * (64 * 256 + 128 * 256)
              + 2 * 4 * 4 * (256 * 128 + 9 * 128 * 128) + 2 * 2 * 2 * (128 * 512 + 256 * 512))
    c, tokens = 512, 2 * 2 + 1  # attention pool: one query over 5 tokens
    pool = 2 * c * c + 2 * 2 * tokens * c * c + 2 * 2 * tokens * c + 2 * c * 64
    assert flops.image_tower(RESNET) == stem + blocks + pool


def test_step_counts_forward_backward_and_the_teacher():
    image, text = flops.image_tower(VIT), flops.text(24, 128, 2, 64)
    counted = flops.step(VIT, 16, teacher_rows=8)
    similarity = 2 * 16 * 16 * 64
    assert counted.train == 3 * (16 * (image + text) + similarity)
    assert counted.teacher == 8 * (image + text) + 2 * 8 * 16 * 64
    assert counted.total == counted.train + counted.teacher
    assert flops.step(VIT, 16).teacher == 0


def test_configs_flops_name_the_teacher():
    config = config_lib.base_config()
    config.data.global_batch = 8
    config.loss.kind = 'psd'
    config.loss.psd.teacher = 'ema'
    config.loss.psd.subset_fraction = 0.5
    with_teacher = flops.from_config(config)
    assert with_teacher.teacher > 0
    config.loss.kind = 'clip'
    assert flops.from_config(config).teacher == 0
    assert flops.from_config(config).train == with_teacher.train


def _xla(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.fixture(scope='module', params=['vit', 'resnet'])
def model(request):
    spec = VIT if request.param == 'vit' else RESNET
    net = build_model(spec)
    images, tokens = jnp.zeros((4, 64, 64, 3)), jnp.ones((4, 24), jnp.int32)
    variables = jax.jit(net.init)(jax.random.key(0), images, tokens)
    return request.param, spec, net, variables, images, tokens


def test_xla_counts_what_the_architecture_implies(model):
    """XLA also counts elementwise work (LayerNorm, softmax, activations: +2% here) and, for
    convolutions, only the taps inside the image (a padded 3x3 convolution on a 2 x 2 map
    multiplies 4 of 9 taps): so a ViT reads 0-5% above the model count and this 64-px
    ResNet 3-10% below (the gap shrinks as maps grow). Training: forward + 2 x backward."""
    kind, spec, net, variables, images, tokens = model
    image = _xla(lambda v, x: net.apply(v, x, method=net.encode_image), variables, images) / 4
    text = _xla(lambda v, t: net.apply(v, t, method=net.encode_text), variables, tokens) / 4
    assert 1.0 <= text / flops.text(24, 128, 2, 64) <= 1.05
    low, high = (1.0, 1.05) if kind == 'vit' else (0.90, 0.97)
    assert low <= image / flops.image_tower(spec) <= high, image / flops.image_tower(spec)

    def loss(params, x, t):
        out = net.apply({**variables, 'params': params}, x, t, train=True,
                        mutable=['batch_stats'])[0]
        return jax.nn.logsumexp(out['image'] @ out['text'].T, axis=1).sum()

    trained = _xla(jax.grad(loss), variables['params'], images, tokens)
    ratio = trained / flops.step(spec, 4).train
    assert (1.0 <= ratio <= 1.05) if kind == 'vit' else (0.93 <= ratio <= 1.0), ratio


def test_float32_reads_the_tf32_peak_on_nvidia_gpus():
    h100 = types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3', platform='gpu')
    peak, why = mfu.peak_flops(0.0, h100, 'float32')
    assert peak == 494e12 and 'tensorfloat32' in why
    assert mfu.table_peak('NVIDIA A100-SXM4-40GB', 'float32') == 156e12
    assert mfu.table_peak('NVIDIA H200', 'bfloat16') == 989e12
    assert mfu.table_peak('TPU v4', 'float32') == 275e12  # bfloat16 passes on a TPU
    with jax.default_matmul_precision('highest'):
        assert mfu.table_peak('NVIDIA H100 80GB HBM3', 'float32') == 67e12
        assert 'float32 peak' in mfu.peak_flops(0.0, h100, 'float32')[1]
