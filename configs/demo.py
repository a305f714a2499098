"""The demo: PSD on real emoji artwork, trained on one artist's style, evaluated on the other.

    python -m psd_jax.data.fetch && python -m psd_jax.main --config configs/demo.py --workdir /tmp/psd_demo

base_config()'s tiny ViT (32 px, patch 8) and text transformer with CLIP's BPE, trained on the
1,911 Google emoji with their English names as captions, with base_config()'s PSD setting (the
one the project's selection protocol chose, docs/results/protocol.md: an EMA teacher,
momentum 0.99, at twice the student's temperature on half of each batch, a ramped linearly to
0.5 and weighted per row by the teacher's mass off the given pair). Ends with image <-> caption retrieval on the 1,911 Twitter-style emoji (held out): about
2 minutes on a 2-core CPU; see the README for the numbers it reaches. Zero-shot classification
of the held-out emoji into their 10 groups is reported too.
"""

from psd_jax.config import base_config


def get_config():
    config = base_config()
    config.data.global_batch = 128
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 50
    config.optim.weight_decay = 0.1
    config.train.steps = 1000
    config.train.log_every = 50
    config.train.checkpoint_every = 250
    config.train.eval_every = 250
    config.eval.evaluators = ('retrieval', 'zero_shot')
    return config
