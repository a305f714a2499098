"""The training loop: mesh -> data -> state -> compiled step -> resume -> steps, metrics,
checkpoints, evaluations -> final checkpoint. One readable function, `train_and_evaluate`."""

from __future__ import annotations

import json
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from psd_jax import checkpointing, config as config_lib, metrics, sharding, step
from psd_jax.data import pipeline
from psd_jax.data.from_config import make_tokenizer, open_split
from psd_jax.evaluation import run as evaluation


def global_batch(host_batch: dict, mesh,
                 keys=('image', 'text', 'teacher_image', 'index')) -> dict:
    """This host's numpy batch -> global jax.Arrays sharded over the data axes (explicit)."""
    rows = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(rows, np.asarray(v))
            for k, v in host_batch.items() if k in keys}


def stop_here(preempted: checkpointing.PreemptionFlag, step_number: int) -> bool:
    """Whether to checkpoint and stop after this step. With several hosts, every host must agree
    on the step, so JAX's preemption sync point decides (it sees SIGTERM on any host)."""
    if jax.process_count() == 1:
        return bool(preempted)
    from jax.experimental import multihost_utils
    try:
        return multihost_utils.reached_preemption_sync_point(step_number)
    except RuntimeError:  # no preemption service in this runtime: rely on periodic checkpoints
        return False


def noisy_captions(config: ml_collections.ConfigDict, source):
    """The training source with `data.caption_noise` of its captions corrupted as
    `data.caption_noise_kind` says (grouped kinds use `data.caption_noise_group`)."""
    group = config.data.caption_noise_group
    names = None
    if config.data.caption_noise_kind == 'group_name':
        features = getattr(getattr(source, 'dataset_info', None), 'features', {})
        if group not in features:
            raise ValueError(f'config.data.caption_noise_group={group!r}: the dataset has no '
                             f'such class feature; it has {sorted(features)}')
        names = features[group].names
    return pipeline.CaptionNoise(source, config.data.caption_noise, config.seed,
                                 kind=config.data.caption_noise_kind, group_key=group,
                                 group_names=names)


def run_evaluators(config, setup, state, tokenizer) -> dict[str, float]:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return evaluation.run_evaluators(config, setup.model, variables, setup.mesh, tokenizer)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (resuming from `workdir` when it holds a checkpoint) and evaluate; returns the last
    logged metrics including the final evaluation."""
    config_lib.validate(config)
    workdir = epath.Path(workdir)  # a local path or gs://... (with gcsfs installed)
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    if lead:
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=1))

    mesh = sharding.make_mesh(config.mesh.to_dict())
    sharding.check_batch(config.data.global_batch, mesh, 'config.data.global_batch')
    logging.info('%s', sharding.describe(mesh))
    tokenizer = make_tokenizer(config)
    source = open_split(config, config.data.train_split)
    if config.data.caption_noise:
        source = noisy_captions(config, source)
    setup = config_lib.step_setup(config, mesh, dataset_size=len(source))
    if setup.loss.needs_index:
        source = pipeline.WithIndex(source)
    def training_data(start_batch: int = 0):
        return iter(pipeline.make_loader(
            source, global_batch=config.data.global_batch, image_size=config.model.image_size,
            tokenizer=tokenizer, context_length=config.model.context_length, train=True,
            seed=config.seed, worker_count=config.data.workers,
            keep=('index',) if setup.loss.needs_index else (),
            teacher_view=setup.loss.needs_teacher_forward,
            crop_scale=tuple(config.data.crop_scale), start_batch=start_batch,
            carried=setup.carried))

    iterator = training_data()

    shardings = step.state_shardings(setup, config.param_sharding)
    b, s = config.data.global_batch, config.model.image_size
    example = {'image': jax.ShapeDtypeStruct((b, s, s, 3), np.float32),
               'text': jax.ShapeDtypeStruct((b, config.model.context_length), np.int32)}
    if setup.loss.needs_teacher_forward:
        example['teacher_image'] = example['image']
    if setup.loss.needs_index:
        example['index'] = jax.ShapeDtypeStruct((b,), np.int32)
    train_step = step.compile_train_step(setup, shardings, example)
    memory = train_step.memory_analysis()
    flops = (train_step.cost_analysis() or {}).get('flops', 0.0)
    if memory is not None:
        logging.info('train step memory per device: %.1f MiB temporaries, %.1f MiB arguments',
                     memory.temp_size_in_bytes / 2**20, memory.argument_size_in_bytes / 2**20)

    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints,
                                      config.train.keep_every)
    if ckpt.latest_step() is not None:
        saved_hosts = ckpt.saved_process_count()
        same_hosts = saved_hosts in (None, jax.process_count())
        state, start = ckpt.restore(step.abstract_state(setup, shardings),
                                    iterator if same_hosts else None)
        if not same_hosts:  # each host's saved position is for another split of the batches
            iterator = training_data(start_batch=start)
            logging.warning('checkpoint written by %d hosts, resumed on %d: the data restarts '
                            'at global batch %d of the same order', saved_hosts,
                            jax.process_count(), start)
        logging.info('resumed from step %d of %s', start, ckpt.directory)
    else:
        state = step.init_state(setup, jax.random.key(config.seed), config.param_sharding)
        start = 0

    writer = metrics.MetricsWriter(workdir, total_steps=config.train.steps, start_step=start,
                                   tensorboard=config.metrics.tensorboard,
                                   wandb_project=config.metrics.wandb_project,
                                   config=config.to_dict(), active=lead)
    config_dict = json.loads(config.to_json_best_effort())
    last: dict[str, float] = {}
    stopped = False
    # one host: our SIGTERM handler; several: JAX's preemption service owns SIGTERM
    with checkpointing.PreemptionFlag(install=jax.process_count() == 1) as preempted:
        tick, tick_step = time.perf_counter(), start
        for current in range(start, config.train.steps):
            host_batch = next(iterator)
            with jax.transfer_guard(config.train.transfer_guard):  # only explicit copies here
                state, step_metrics = train_step(state, global_batch(host_batch, mesh))
            done = current + 1
            if done % config.train.log_every == 0 or done == config.train.steps:
                scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                elapsed = time.perf_counter() - tick
                per_step = elapsed / max(done - tick_step, 1)
                scalars.update(step_time_s=per_step, images_per_s=b / per_step)
                if flops and config.metrics.peak_flops_per_device:
                    scalars['mfu'] = flops / per_step / config.metrics.peak_flops_per_device
                last = dict(scalars)
                writer.write(done, scalars)
                tick, tick_step = time.perf_counter(), done
            writer.advance(done)
            if config.train.eval_every and done % config.train.eval_every == 0 and (
                    done != config.train.steps):
                writer.write(done, run_evaluators(config, setup, state, tokenizer))
                tick, tick_step = time.perf_counter(), done
            if stop_here(preempted, done):
                logging.warning('SIGTERM: checkpointing step %d and exiting', done)
                ckpt.save(done, state, iterator, config_dict, force=True)
                stopped = True
                break
            if done % config.train.checkpoint_every == 0:
                ckpt.save(done, state, iterator, config_dict)
                tick, tick_step = time.perf_counter(), done  # step times exclude saves
    if not stopped:
        if ckpt.latest_step() != config.train.steps:
            ckpt.save(config.train.steps, state, iterator, config_dict, force=True)
        final = run_evaluators(config, setup, state, tokenizer)
        writer.write(config.train.steps, final)
        last.update(final)
        if lead:
            (workdir / 'final_metrics.json').write_text(json.dumps(last, indent=1))
    ckpt.close()
    writer.close()
    if lead:
        metrics.plot(workdir)
    return last
