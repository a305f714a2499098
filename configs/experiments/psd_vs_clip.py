"""The PSD vs CLIP experiment's base runs (experiments/psd_vs_clip.py sweeps over them).

    python -m psd_jax.main --config configs/experiments/psd_vs_clip.py:emoji --workdir /tmp/e
    python -m psd_jax.main --config configs/experiments/psd_vs_clip.py:fashion --workdir /tmp/f
    python -m psd_jax.main --config configs/experiments/psd_vs_clip.py:emoji_styles --workdir /tmp/s

emoji: the demo's model and data (train on the Google style, evaluate retrieval and zero-shot
on the held-out Twitter style), 300 steps of batch 128 (20 epochs of the 1,911 pairs).
emoji_styles: the same names drawn by two artists at once (Google and Twitter: 3,822 pairs,
every caption on two images: natural many-to-many pairs), evaluated by retrieval and zero-shot
on a third artist's drawings (OpenMoji, held out), 300 steps of batch 128.
fashion: Fashion-MNIST with templated captions ('a photo of a {class}.'), the same model,
300 steps of batch 128; zero-shot and a linear probe (5,000 training images) on the test set.
Both start as CLIP; the sweep sets the loss, the noise and the seed by overrides. About two
minutes per run on a 2-core CPU.
"""

from psd_jax.config import base_config

DATASETS = ('emoji', 'emoji_styles', 'fashion')


def get_config(dataset: str = 'emoji'):
    if dataset not in DATASETS:
        raise ValueError(f'configs/experiments/psd_vs_clip.py:{dataset}: allowed {DATASETS}')
    config = base_config()
    config.model.preset = 'tiny'
    config.model.image_size = 32
    config.model.context_length = 16
    config.data.global_batch = 128
    config.data.workers = 1  # decoding overlaps the step (same batches as 0 workers)
    config.loss.kind = 'clip'
    config.loss.alpha_schedule = 'linear'
    config.loss.alpha_max = 0.5
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 30
    config.optim.weight_decay = 0.1
    config.train.steps = 300
    config.train.log_every = 25
    config.train.checkpoint_every = 100
    config.train.keep_checkpoints = 1
    config.metrics.tensorboard = False
    if dataset == 'emoji':
        config.data.dataset = 'emoji'
        config.data.builder_config = 'label'
        config.data.train_split = 'google'
        config.eval.split = 'twitter'
        config.eval.evaluators = ('retrieval', 'zero_shot')
    elif dataset == 'emoji_styles':
        config.data.dataset = 'emoji_styles'
        config.data.builder_config = ''
        config.data.train_split = 'train'
        config.eval.split = 'openmoji'
        config.eval.evaluators = ('retrieval', 'zero_shot')
    else:
        config.data.dataset = 'fashion_mnist_local'
        config.data.builder_config = ''
        config.data.train_split = 'train'
        config.data.caption_noise_group = 'label'
        config.eval.split = 'test'
        config.eval.evaluators = ('zero_shot', 'linear_probe')
        config.eval.probe_examples = 5000
    return config
