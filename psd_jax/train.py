"""The training loop: mesh -> data -> state -> compiled step -> resume -> steps, metrics,
checkpoints, evaluations -> final checkpoint. `train_and_evaluate` reads as that sequence; each
part is a named function below it."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from psd_jax import batch as batch_lib
from psd_jax import checkpointing, config as config_lib, guard, layout, metrics, resume, sharding
from psd_jax import flops as flops_lib, mfu as mfu_lib, pretrained
from psd_jax import step
from psd_jax import workdir as workdir_lib
from psd_jax.data import datasets
from psd_jax.data.from_config import make_tokenizer, training_loader, training_source
from psd_jax.evaluation import run as evaluation


class Preempted(Exception):
    """SIGTERM stopped the run after it checkpointed; rerunning the command resumes it
    (psd_jax.main exits with PREEMPTED_EXIT_CODE so that a scheduler requeues it)."""


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as a process killed by SIGTERM reports


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (resuming from `workdir` when it holds a checkpoint) and evaluate; returns the last
    logged metrics including the final evaluation. Raises Preempted after a SIGTERM checkpoint,
    guard.TrainingDiverged when the run diverged (its last good checkpoint stays)."""
    config_lib.validate(config)
    workdir = epath.Path(workdir)  # a local path or gs://... (with gcsfs installed)
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    with workdir_lib.WorkdirLock(workdir, active=lead):
        mesh = sharding.make_mesh(config.mesh.to_dict())
        sharding.check_batch(config.data.global_batch, mesh, 'config.data.global_batch')
        logging.info('%s', sharding.describe(mesh))
        tokenizer = make_tokenizer(config)
        config_lib.check_own_data(config)
        source = training_source(config)
        evaluation.check_evaluators(config)  # an evaluation error must not wait for the end
        setup = config_lib.step_setup(config, mesh, dataset_size=len(source))
        spec = step.batch_spec(setup, config.data.global_batch)

        def data(start_batch: int = 0) -> Iterator[dict]:
            return training_loader(config, source, tokenizer, spec, setup.carried, start_batch)

        shardings = step.state_shardings(setup, config.param_sharding)
        ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints,
                                          config.train.keep_every)
        ckpt.dataset = datasets.identity(source)
        writer = None
        try:
            state, start, iterator = restore_or_init(config, setup, shardings, ckpt, data,
                                                     workdir)
            train_step, flops = compile_step(setup, shardings, spec)
            writer = metrics.MetricsWriter(
                workdir, total_steps=config.train.steps, start_step=start,
                tensorboard=config.metrics.tensorboard,
                wandb_project=config.metrics.wandb_project, config=config.to_dict(),
                active=lead)
            loop = Loop(config, setup, spec, train_step, flops, ckpt, writer, tokenizer, workdir)
            state, stopped = loop.run(state, start, iterator)
            if stopped:
                raise Preempted(f'preempted: checkpointed step {ckpt.latest_step()} of '
                                f'{workdir}; run the same command again to resume')
            last = loop.finish(state, iterator)
        finally:
            close_quietly(ckpt, writer)
    if lead:
        metrics.plot(workdir)
    return last


def close_quietly(ckpt: checkpointing.Checkpointer, writer) -> None:
    """Close the checkpointer (waiting for its pending saves to commit) and the writer on every
    exit path; a failure here is logged, not raised over the error that ended the run."""
    for name, closer in (('checkpointer', ckpt.close),
                         ('metrics writer', writer.close if writer else None)):
        if closer is None:
            continue
        try:
            closer()
        except Exception as e:  # noqa: BLE001
            logging.error('closing the %s failed: %s', name, e)


def compile_step(setup: step.StepSetup, shardings: step.TrainState,
                 spec: dict) -> tuple[Callable, float]:
    """The train step compiled ahead of time for `spec`'s batches; logs its memory per device
    and returns it with its FLOPs per step (0 when the backend does not say)."""
    compiled = step.compile_train_step(setup, shardings, spec)
    memory = compiled.memory_analysis()
    if memory is not None:
        logging.info('train step memory per device: %.1f MiB temporaries, %.1f MiB arguments',
                     memory.temp_size_in_bytes / 2**20, memory.argument_size_in_bytes / 2**20)
    return compiled, mfu_lib.step_flops(compiled)


def restore_or_init(config: ml_collections.ConfigDict, setup: step.StepSetup,
                    shardings: step.TrainState, ckpt: checkpointing.Checkpointer,
                    data: Callable[[int], Iterator[dict]],
                    workdir: epath.Path) -> tuple[step.TrainState, int, Any]:
    """(state, first step, data iterator): the newest readable checkpoint's, or a fresh state
    at step 0; then the config is recorded (config.json, config_history.jsonl).

    Before a checkpoint's state is read, its config is compared with this one
    (psd_jax/resume.py): a change to a key that defines the run is refused by name, and
    nothing is written; so is a change of the training data (its identity, saved with each
    checkpoint) unless train.resume_allow_changes lists 'data'. A checkpoint written by another
    number of hosts holds per-host data positions for another split of the batches, and one of
    other data positions in other data: then the data restarts at its global batch."""
    config_dict = json.loads(config.to_json_best_effort())
    changed: dict = {}

    def check(saved: dict, saved_data: dict | None, at: int) -> bool:
        changed.update(resume.check_resume(saved, config_dict, at, str(ckpt.directory)))
        data_change = resume.check_data(saved_data, ckpt.dataset, at, config_dict)
        if data_change:
            changed['data'] = (saved_data, ckpt.dataset)
            logging.warning('the training data changed since step %d: %s; accepted '
                            '(train.resume_allow_changes), its order starts again at global '
                            'batch %d', at, data_change, at)
        return data_change is None

    if ckpt.latest_step() is None:
        state = step.init_state(setup, jax.random.key(config.seed), config.param_sharding)
        if config.model.init_from:
            state = pretrained.into_state(state, pretrained.for_config(config), shardings,
                                          config.model.scan_layers)
            logging.info('parameters from %s (the optimizer starts fresh)',
                         config.model.init_from)
        start, iterator = 0, data(0)
    else:
        plan: list = []  # the restore plan of the checkpoint last tried (the one restored)

        def abstract_for(saved: dict) -> step.TrainState:
            plan[:] = layout.restore_plan(setup, config.param_sharding, saved)
            return plan[0]

        state, start, iterator, _ = ckpt.restore_newest_readable(
            abstract_for, lambda: data(0), check)
        state = plan[1](state)  # into this config's layout
        if iterator is None:  # per-host positions are for another split of the batches
            iterator = data(start)
            if 'data' not in changed:
                logging.warning('checkpoint written by %d hosts, resumed on %d: the data '
                                'restarts at global batch %d of the same order',
                                ckpt.saved_process_count(start), jax.process_count(), start)
        for key, (old, new) in changed.items():
            if key == 'data':
                continue
            logging.info('config.%s changed since the checkpoint: %r -> %r', key, old, new)
        logging.info('resumed from step %d of %s', start, ckpt.directory)
    if jax.process_index() == 0:
        workdir_lib.record_config(workdir, config_dict, start, changed)
    return state, start, iterator


def to_global(host_batch: dict, spec: dict, mesh) -> dict:
    """This host's numpy batch (its rows of every global batch) -> global jax.Arrays sharded
    over the data axes, checked against `spec` (step.batch_spec) first."""
    batch_lib.check(host_batch, spec, 'training batch from the input pipeline',
                    rows=next(iter(spec.values())).shape[0] // jax.process_count())
    rows = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(rows, np.asarray(v), spec[k].shape)
            for k, v in host_batch.items()}


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


@dataclasses.dataclass
class Loop:
    """The step loop and what happens between steps: metrics every `train.log_every` steps
    (step time measured between logs, excluding saves and evaluations), evaluations every
    `train.eval_every`, checkpoints every `train.checkpoint_every`, the non-finite guard's
    verdict at each of those, and a checkpoint and clean stop on preemption."""
    config: ml_collections.ConfigDict
    setup: step.StepSetup
    spec: dict
    train_step: Callable
    flops: float  # XLA's count per device (hfu)
    ckpt: checkpointing.Checkpointer
    writer: metrics.MetricsWriter
    tokenizer: Callable
    workdir: epath.Path

    def __post_init__(self):
        self.config_dict = json.loads(self.config.to_json_best_effort())
        self.tick, self.tick_step = time.perf_counter(), 0
        self.last: dict[str, float] = {}  # the last logged metrics
        device = self.setup.mesh.devices.flat[0]
        self.peak, source = mfu_lib.peak_flops(self.config.metrics.peak_flops_per_device,
                                               device, self.config.model.dtype)
        model = flops_lib.from_config(self.config)
        self.model_flops = model.total / self.setup.mesh.size  # per device
        if self.peak is None:
            logging.warning('MFU not reported: peak FLOP/s %s', source)
        else:
            logging.info('MFU against %.1f TFLOP/s per device (%s); model FLOPs per step %.4g '
                         'T (teacher forward %.4g T of them), %.4g T per device; XLA counts '
                         '%.4g T per device (hfu)', self.peak / 1e12, source, model.total / 1e12,
                         model.teacher / 1e12, self.model_flops / 1e12, self.flops / 1e12)

    def run(self, state, start: int, iterator) -> tuple[Any, bool]:
        """Steps from `start` to train.steps; returns (state, whether a preemption stopped
        it)."""
        self.tick, self.tick_step = time.perf_counter(), start
        # one host: our SIGTERM handler; several: JAX's preemption service owns SIGTERM
        with checkpointing.PreemptionFlag(install=jax.process_count() == 1) as preempted:
            for done in range(start + 1, self.config.train.steps + 1):
                batch = next(iterator)
                self.profile(done, 'start')
                with jax.transfer_guard(self.config.train.transfer_guard):  # explicit copies only
                    state, step_metrics = self.train_step(
                        state, to_global(batch, self.spec, self.setup.mesh))
                self.profile(done, 'stop', state)
                if self.log(done, step_metrics):
                    self.check_health(done, state)
                self.evaluate_if_due(done, state)
                if stop_here(preempted, done):
                    self.check_health(done, state)
                    logging.warning('SIGTERM: checkpointing step %d and exiting', done)
                    self.ckpt.save(done, state, iterator, self.config_dict, force=True)
                    return state, True
                self.checkpoint_if_due(done, state, iterator)
        return state, False

    def profile(self, done: int, event: str, state: Any = None) -> None:
        """Start a jax.profiler trace before step train.profile_steps[0]; stop it after
        step [1] (once the step's work is done), into <workdir>/profile."""
        steps = tuple(self.config.train.profile_steps)
        if not steps:
            return
        if event == 'start' and done == steps[0]:
            jax.profiler.start_trace(str(self.workdir / 'profile'))
        elif event == 'stop' and done == steps[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            logging.info('profile of steps %d-%d written to %s', *steps, self.workdir / 'profile')

    def log(self, done: int, step_metrics: dict) -> dict | None:
        """Write the step's metrics (with step time, images/s, MFU) when a log step is due."""
        train = self.config.train
        if done % train.log_every and done != train.steps:
            self.writer.advance(done)
            return None
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        per_step = (time.perf_counter() - self.tick) / max(done - self.tick_step, 1)
        scalars.update(step_time_s=per_step,
                       images_per_s=self.config.data.global_batch / per_step)
        for name, count in (('mfu', self.model_flops), ('hfu', self.flops)):
            utilisation = mfu_lib.mfu(count, per_step, self.peak)
            if utilisation is not None:
                scalars[name] = utilisation
        self.writer.write(done, scalars)
        self.writer.advance(done)
        self.tick, self.tick_step = time.perf_counter(), done
        self.last = scalars
        return scalars

    def check_health(self, done: int, state) -> None:
        """Stop (guard.TrainingDiverged) when skipped non-finite steps exceed the policy."""
        health = jax.device_get(state.health)
        if int(health['skipped_in_a_row']):
            logging.warning('step %d: %d step(s) in a row, %d in all, had a non-finite loss or '
                            'update and were skipped', done, health['skipped_in_a_row'],
                            health['skipped_total'])
        guard.check_health(health, self.config.train.nonfinite,
                           self.config.train.nonfinite_limit, done, self.ckpt.latest_step())

    def evaluate_if_due(self, done: int, state) -> None:
        """Periodic evaluation (the final one belongs to `finish`)."""
        train = self.config.train
        if train.eval_every and done % train.eval_every == 0 and done != train.steps:
            self.writer.write(done, self.evaluate(state, done))
            self.tick, self.tick_step = time.perf_counter(), done

    def checkpoint_if_due(self, done: int, state, iterator) -> None:
        """Periodic checkpoint (the final one belongs to `finish`); never of a run the guard
        stops."""
        if done % self.config.train.checkpoint_every == 0:
            self.check_health(done, state)
            self.ckpt.save(done, state, iterator, self.config_dict)
            self.tick, self.tick_step = time.perf_counter(), done  # step times exclude saves

    def evaluate(self, state, step: int) -> dict[str, float]:
        """The evaluators and the suite on `state`; the suite's table goes to
        <workdir>/eval/suite_step_<step>.md and .json."""
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        return evaluation.run_evaluators(self.config, self.setup.model, variables,
                                         self.setup.mesh, self.tokenizer,
                                         report_dir=self.workdir / 'eval', step=step)

    def finish(self, state, iterator) -> dict[str, float]:
        """The final checkpoint, committed before the final evaluation starts (an evaluation
        error cannot cost it), then the evaluation; final_metrics.json holds the last logged
        metrics and what the evaluators gave, also when one of them failed (the error is
        raised after). Returns that dict."""
        steps = self.config.train.steps
        self.check_health(steps, state)
        if self.ckpt.latest_step() != steps:
            self.ckpt.save(steps, state, iterator, self.config_dict, force=True)
        self.ckpt.wait()
        logging.info('checkpoint %d committed in %s', steps, self.ckpt.directory)
        try:
            final = self.evaluate(state, steps)
            failure = None
        except evaluation.EvaluationFailed as e:
            final, failure = e.partial, e
        if final:
            self.writer.write(steps, final)
        result = {**self.last, **final}
        if jax.process_index() == 0:
            (self.workdir / 'final_metrics.json').write_text(json.dumps(result, indent=1))
        if failure is not None:
            raise failure
        return result
