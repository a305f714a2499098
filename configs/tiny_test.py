"""The tests' config: a tiny ViT + text tower on the emoji data, a few steps, PSD on.

    python -m psd_jax.main --config configs/tiny_test.py --workdir /tmp/tiny

Seconds per step on a CPU; reaches nothing in particular (it exists to exercise the loop).
"""

from psd_jax.config import base_config


def get_config():
    config = base_config()
    config.model.image_size = 32
    config.model.context_length = 16
    config.data.global_batch = 32
    config.train.steps = 6
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.optim.warmup_steps = 2
    config.eval.batch = 256
    config.metrics.tensorboard = True
    return config
