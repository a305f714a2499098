"""The default experiment config and its translation into the library's objects.

Every config in configs/ starts from `base_config()` and changes what it needs; the result is
locked, so a mistyped key fails with the nearest valid one (ml_collections' message).
`validate(config)` checks values across keys and names the key at fault.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import ml_collections

from psd_jax import losses, sharding
from psd_jax.training import accumulate, guard, schedules, step
from psd_jax.evaluation import run as evaluation
from psd_jax.data import builders, datasets, pipeline
from psd_jax.models import DTYPES, ModelSpec, build_model, preset
from psd_jax.models.layers import ACTIVATIONS, ATTENTION_IMPLS, REMAT_POLICIES

C = ml_collections.ConfigDict


def loss_defaults() -> dict:
    """config.loss.psd's keys and defaults: LossConfig's fields but kind, impl, tile and
    precision."""
    fields = dataclasses.asdict(losses.LossConfig())
    for key in losses.config.CONFIG_LOSS_KEYS:  # config.loss's own keys
        del fields[key]
    return fields


def base_config() -> ml_collections.ConfigDict:
    """All keys with working defaults (a tiny model on the emoji data)."""
    config = C()
    config.seed = 0
    config.mesh = C({'data': -1, 'fsdp': 1, 'model': 1})
    config.param_sharding = 'replicated'  # replicated | fsdp | fsdp_tp

    config.model = C()
    config.model.preset = 'tiny'
    config.model.dtype = 'float32'  # float32 | bfloat16 (compute; parameters stay float32)
    config.model.image_size = 32
    config.model.vocab_size = 49408
    config.model.context_length = 16
    config.model.embed_dim = 0  # 0: the preset's
    config.model.text_pool = 'argmax'  # argmax (CLIP BPE) | last (SentencePiece)
    config.model.act = ''  # '': the preset's (quick_gelu) | quick_gelu | gelu (exact) | gelu_tanh
    # pretrained weights to start from (OpenAI CLIP / open_clip: a .safetensors, .bin or .pt
    # file, or an open_clip folder); the optimizer starts fresh (psd_jax/pretrained.py)
    config.model.init_from = ''
    # memory levers that leave the values alone: what a transformer (or ResNet) block keeps
    # for the backward pass (none | minimal: matmul outputs | full: recompute the block), and
    # the transformer blocks under one scan (compile time independent of depth; parameters
    # stacked, so a checkpoint keeps the layout it was written with)
    config.model.remat = 'none'
    config.model.scan_layers = False
    # fraction of image patches a ViT drops at random in training (FLIP; 0: none): fewer
    # tokens per image, a faster step
    config.model.patch_dropout = 0.0
    # xla | cudnn (fused flash attention on NVIDIA GPUs; needs model.dtype='bfloat16')
    config.model.attention = 'xla'

    config.data = C()
    config.data.dataset = 'emoji'  # a prepared tfds dataset, see psd_jax.data.datasets
    config.data.builder_config = 'label'
    config.data.path = ''  # for image_text_shards / image_folder_classification
    config.data.data_dir = ''  # '' -> $PSD_JAX_CACHE/tfds
    config.data.train_split = 'google'
    config.data.tokenizer = 'clip'  # clip | sentencepiece
    config.data.vocab_path = ''  # '' -> the fetched CLIP vocabulary
    config.data.global_batch = 64
    config.data.caption_noise = 0.0  # fraction of training captions corrupted (experiments)
    config.data.caption_noise_kind = 'shuffle'  # shuffle | within_group | group_name
    config.data.caption_noise_group = 'subgroup'  # the class feature grouped kinds use
    config.data.workers = 0
    # threads reading records ahead of the pipeline (per process), and how many records they
    # keep ready: 0 reads in the pipeline's own thread, fastest for local data (the demo sets);
    # remote storage (gs://) wants reading ahead, e.g. 16 threads, 500 records
    config.data.read_threads = 0
    config.data.read_ahead = 0
    config.data.crop_scale = (0.9, 1.0)  # random resized crop: area fraction (1, 1: none)

    config.loss = C()
    defaults = losses.LossConfig()  # the one place the loss's defaults are written
    config.loss.kind = defaults.kind  # clip | psd | sigmoid
    # The PSD setting the selection protocol chose (docs/results/protocol.md): an EMA teacher
    # (momentum 0.99) at twice the student's temperature on half of each batch, a ramped
    # linearly to 0.5, each row's share a weighted by the teacher's off-diagonal mass.
    # The psd keys, their defaults and allowed values are losses.LossConfig's (teacher:
    # same_pass | second_pass | ema | bank | previous_step).
    config.loss.psd = C(loss_defaults())
    # impl: all_gather (b x B slabs per device) | ring (b x tile tiles; very large global
    # batches); tile: the ring's tile width, dividing the per-device batch (0: all of it);
    # precision of the similarity matmuls: float32 (HIGHEST) | bfloat16 (inputs rounded, float32
    # sums; one pass on accelerators; the paper configs use it).
    config.loss.impl, config.loss.tile = defaults.impl, defaults.tile
    config.loss.precision = defaults.precision
    config.loss.alpha_schedule = 'linear'  # linear | cosine | constant
    config.loss.alpha_max = 0.5
    config.loss.alpha_start_step = 0

    config.optim = C()
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.optim.end_lr_fraction = 0.0
    config.optim.weight_decay = 0.2
    config.optim.b1 = 0.9
    config.optim.b2 = 0.98
    config.optim.eps = 1e-6
    config.optim.grad_clip_norm = 1.0

    config.train = C()
    config.train.steps = 100
    config.train.log_every = 10
    # GradCache accumulation: k micro-batches' activations at a time, every negative of the
    # global batch in the loss, the same gradient (psd_jax/training/accumulate.py)
    config.train.micro_batches = 1
    config.train.checkpoint_every = 50
    config.train.keep_checkpoints = 3
    config.train.keep_every = 0  # also keep every N-th step's checkpoint (0: none)
    config.train.eval_every = 0  # 0: only at the end
    # (first, last): a jax.profiler trace of those steps into <workdir>/profile (TensorBoard's
    # profile tab or Perfetto); (): none
    config.train.profile_steps = ()
    config.train.transfer_guard = 'allow'  # around the step loop: allow | log | disallow
    # a step with a non-finite loss or gradient norm, or whose update's norm exceeds
    # max_update_ratio times the parameters' norm (a run blowing up; 0: no such bound), is not
    # applied; 'skip': stop after nonfinite_limit such steps in a row, 'stop': at the first
    # (psd_jax/training/guard.py)
    config.train.nonfinite = 'skip'
    config.train.nonfinite_limit = 10
    config.train.max_update_ratio = 1.0
    # keys that define the run but may change on this resume, deliberately
    # (psd_jax/persistence/resume_rules.py);
    # 'data' accepts a change of the training data itself
    config.train.resume_allow_changes = ()

    config.eval = C()
    config.eval.evaluators = ('retrieval',)  # retrieval | zero_shot | linear_probe
    config.eval.split = 'twitter'  # retrieval and zero-shot split of the training dataset
    config.eval.batch = 256
    config.eval.probe_dataset = 'fashion_mnist_local'  # linear probe: its train -> test
    config.eval.probe_examples = 10000  # training images for the probe (0: all)
    # benchmarks independent of the training data, comma-separated: suites (demo,
    # imagenet_robustness, vtab_classification, clip_benchmark), catalog names (imagenet1k,
    # cifar100, ...) or names of eval.benchmarks entries (psd_jax/evaluation/benchmarks.py)
    config.eval.suite = ''
    config.eval.benchmarks = C()  # own benchmarks: name -> dict(task, dataset, split, ...)
    config.eval.data_dir = ''  # where the suite's tfds datasets are prepared ('': data.data_dir)

    config.metrics = C()
    config.metrics.tensorboard = True
    config.metrics.wandb_project = ''
    # for MFU; 0: the device's peak from psd_jax/training/mfu.py's table (a matmul probe on CPUs)
    config.metrics.peak_flops_per_device = 0.0
    return config


def paper_base(preset: str, dataset_name: str, data_path: str, global_batch: int, epochs: int,
               train_pairs: int, lr: float, warmup_steps: int):
    """CLIP's recipe at 224 px, context 77, bfloat16 compute, FSDP parameters; the loss, the
    optimiser's betas, epsilon, weight decay and clipping are base_config()'s."""
    config = base_config()
    # FSDP over every device: the batch splits over data x fsdp, and parameters, optimizer
    # state and EMA over fsdp (a pod's data-parallel groups: --config.mesh.data=N)
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.param_sharding = 'fsdp'
    config.model.preset = preset
    config.model.dtype = 'bfloat16'
    config.loss.precision = 'bfloat16'
    config.model.image_size = 224
    config.model.context_length = 77
    config.data.dataset = 'image_text_shards'
    config.data.builder_config = dataset_name
    config.data.path = data_path
    config.data.train_split = 'train'
    config.data.global_batch = global_batch
    config.data.workers = 16
    config.data.read_threads, config.data.read_ahead = 16, 500  # shards on remote storage
    config.optim.lr = lr
    config.optim.warmup_steps = warmup_steps
    config.train.steps = epochs * train_pairs // global_batch
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.keep_every = 10000
    config.train.eval_every = 5000
    config.eval.split = 'validation'
    config.eval.batch = 1024
    return config


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ValueError(f'config.{key}: {message}')


def validate(config: ml_collections.ConfigDict) -> None:
    """Cross-key checks; each failure names its key and what is allowed."""
    _check(config.param_sharding in sharding.PARTITION_RULES, 'param_sharding',
           f'{config.param_sharding!r} is not one of {sorted(sharding.PARTITION_RULES)}')
    _check(config.model.dtype in DTYPES, 'model.dtype',
           f'{config.model.dtype!r} is not one of {sorted(DTYPES)}')
    _check(config.data.tokenizer in ('clip', 'sentencepiece'), 'data.tokenizer',
           f"{config.data.tokenizer!r} is not one of ['clip', 'sentencepiece']")
    _check(config.data.global_batch > 0, 'data.global_batch', 'must be positive')
    _check(0 <= config.data.read_threads <= max(config.data.read_ahead, 0), 'data.read_threads',
           f'{config.data.read_threads} with data.read_ahead={config.data.read_ahead}: need '
           '0 <= read_threads <= read_ahead (0 and 0: read in the pipeline\'s thread)')
    _check(config.model.remat in REMAT_POLICIES, 'model.remat',
           f'{config.model.remat!r} is not one of {list(REMAT_POLICIES)}')
    _check(not config.model.init_from
           or pathlib.Path(config.model.init_from).expanduser().exists(), 'model.init_from',
           f'{config.model.init_from!r}: no such file or folder (a .safetensors, .bin or .pt '
           'file, or an open_clip folder)')
    _check(config.model.act in ('',) + tuple(ACTIVATIONS), 'model.act',
           f'{config.model.act!r} is not one of {["", *ACTIVATIONS]}')
    _check(config.model.attention in ATTENTION_IMPLS, 'model.attention',
           f'{config.model.attention!r} is not one of {list(ATTENTION_IMPLS)}')
    _check(0.0 <= config.model.patch_dropout < 1.0, 'model.patch_dropout',
           f'{config.model.patch_dropout}: must be in [0, 1)')
    _check(config.train.micro_batches >= 1, 'train.micro_batches',
           f'{config.train.micro_batches}: must be >= 1 (1: no accumulation)')
    _check(0.0 <= config.data.caption_noise <= 1.0, 'data.caption_noise', 'must be in [0, 1]')
    _check(config.data.caption_noise_kind in pipeline.NOISE_KINDS, 'data.caption_noise_kind',
           f'{config.data.caption_noise_kind!r} is not one of {list(pipeline.NOISE_KINDS)}')
    _check(config.train.steps > 0, 'train.steps', 'must be positive')
    _check(config.train.log_every > 0, 'train.log_every', 'must be positive')
    _check(config.train.checkpoint_every >= 1, 'train.checkpoint_every',
           f'{config.train.checkpoint_every}: must be >= 1 (checkpoints are how a run survives)')
    _check(config.train.keep_checkpoints >= 1, 'train.keep_checkpoints',
           f'{config.train.keep_checkpoints}: must be >= 1 (0 would delete every checkpoint)')
    _check(config.train.keep_every >= 0, 'train.keep_every', 'must be >= 0 (0: none)')
    _check(config.train.eval_every >= 0, 'train.eval_every', 'must be >= 0 (0: at the end)')
    profile = tuple(config.train.profile_steps)
    _check(not profile or (len(profile) == 2 and 1 <= profile[0] <= profile[1]
                           <= config.train.steps), 'train.profile_steps',
           f'{profile}: must be () or (first, last) with 1 <= first <= last <= train.steps')
    _check(config.train.nonfinite in guard.POLICIES, 'train.nonfinite',
           f'{config.train.nonfinite!r} is not one of {list(guard.POLICIES)}')
    _check(config.train.nonfinite_limit >= 1, 'train.nonfinite_limit', 'must be >= 1')
    _check(config.train.max_update_ratio >= 0, 'train.max_update_ratio',
           f'{config.train.max_update_ratio}: must be >= 0 (0: no bound)')
    _check(config.data.dataset not in ('image_text_shards', 'image_folder_classification')
           or bool(config.data.path), 'data.path',
           f'dataset {config.data.dataset!r} reads your files: set --config.data.path')
    evaluation.check_names(config)
    _check(config.optim.warmup_steps <= config.train.steps, 'optim.warmup_steps',
           f'{config.optim.warmup_steps} exceeds train.steps={config.train.steps}')
    _check(config.train.transfer_guard in ('allow', 'log', 'disallow'), 'train.transfer_guard',
           f"{config.train.transfer_guard!r} is not one of ['allow', 'log', 'disallow']")
    loss_config(config)  # LossConfig validates its own keys
    schedules.alpha_schedule(config.loss.alpha_schedule, config.loss.alpha_max,
                             config.train.steps, config.loss.alpha_start_step)


def check_own_data(config: ml_collections.ConfigDict) -> None:
    """For datasets read from the user's folders (the trainer calls this before preparing
    them): the folder exists and the split names the config uses are the ones it gives."""
    path = config.data.path
    if config.data.dataset not in datasets.CONFIGS or not path or '://' in path:
        return
    _check(pathlib.Path(path).expanduser().is_dir(), 'data.path', f'{path} is not a directory')
    splits = builders.expected_splits(path)
    _check(config.data.train_split in splits, 'data.train_split',
           f'{config.data.train_split!r}: the folders of {path} give the splits {splits}')
    if set(config.eval.evaluators) & {'retrieval', 'zero_shot'}:
        _check(config.eval.split in splits, 'eval.split',
               f'{config.eval.split!r}: the folders of {path} give the splits {splits} '
               '(val/ is called validation)')


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A config from its JSON record (a run's config.json): base_config() with every saved
    value (lists back to tuples where the base holds tuples), validated; keys base_config()
    no longer has are refused by name."""
    config = base_config()

    def merge(into: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if key not in into:
                if isinstance(into, ml_collections.ConfigDict) and prefix == 'eval.benchmarks.':
                    into[key] = value  # a run's own benchmark entries
                    continue
                raise ValueError(f'the saved config has {prefix}{key}, which this version of '
                                 'psd_jax does not know')
            current = into[key]
            if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
                merge(current, value, f'{prefix}{key}.')
            else:
                into[key] = tuple(value) if isinstance(current, tuple) and isinstance(
                    value, list) else value

    with config.unlocked():
        merge(config, saved, '')
    validate(config)
    return config


def model_spec(config: ml_collections.ConfigDict) -> ModelSpec:
    overrides = {'image_size': config.model.image_size, 'vocab_size': config.model.vocab_size,
                 'context_length': config.model.context_length,
                 'text_pool': config.model.text_pool}
    if config.model.embed_dim:
        overrides['embed_dim'] = config.model.embed_dim
    if config.model.act:
        overrides['act'] = config.model.act
    return preset(config.model.preset, **overrides)


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
    """The run's LossConfig, validated (ValueError naming the key)."""
    return losses.LossConfig.from_mapping(config.loss.kind, config.loss.psd.to_dict(),
                                          impl=config.loss.impl, tile=config.loss.tile,
                                          precision=config.loss.precision)


def check_global_batch(config: ml_collections.ConfigDict, mesh) -> None:
    """The one check of data.global_batch against the run it configures: it splits evenly over
    the mesh's data axes, across the JAX processes, and into train.micro_batches per shard
    (ValueError naming the key and the sizes that would work)."""
    batch = config.data.global_batch  # its sign and the other ranges: validate()
    sharding.check_batch(batch, mesh, 'config.data.global_batch')
    hosts = jax.process_count()
    _check(batch % hosts == 0, 'data.global_batch',
           f'{batch} does not divide across the {hosts} JAX processes; use a multiple of {hosts}')
    accumulate.check_micro_batches(config.train.micro_batches,
                                   batch // sharding.data_size(mesh),
                                   model_spec(config).image['kind'] == 'resnet')


def step_setup(config: ml_collections.ConfigDict, mesh, dataset_size: int = 0) -> step.StepSetup:
    """The static parts of the train step, from the config (`dataset_size`: the number of
    training pairs, which sizes the embedding bank of psd.teacher='bank'); data.global_batch is
    checked against the mesh here (check_global_batch)."""
    check_global_batch(config, mesh)
    loss = loss_config(config)
    platform = mesh.devices.flat[0].platform
    _check(config.model.attention != 'cudnn' or platform == 'gpu', 'model.attention',
           f"'cudnn' runs on NVIDIA GPUs; these devices are {platform}: use 'xla'")
    model = build_model(model_spec(config), config.model.dtype, sigmoid=loss.kind == 'sigmoid',
                        remat=config.model.remat, scan_layers=config.model.scan_layers,
                        patch_dropout=config.model.patch_dropout,
                        attention=config.model.attention)
    lr = schedules.warmup_cosine(config.optim.lr, config.train.steps, config.optim.warmup_steps,
                                 config.optim.end_lr_fraction)
    tx = step.make_optimizer(lr, config.optim.weight_decay, config.optim.b1, config.optim.b2,
                             config.optim.eps, config.optim.grad_clip_norm or None)
    alpha = schedules.alpha_schedule(config.loss.alpha_schedule, config.loss.alpha_max,
                                     config.train.steps, config.loss.alpha_start_step)
    return step.StepSetup(model, tx, loss, alpha, lr, mesh, dataset_size,
                          repeated_pairs=loss.repeated_pairs(config.data.global_batch),
                          micro_batches=config.train.micro_batches,
                          max_update_ratio=config.train.max_update_ratio)
