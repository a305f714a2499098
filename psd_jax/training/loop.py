"""The step loop of a run and what happens between steps: metrics, evaluations, checkpoints,
the divergence guard's verdict on every step, and a clean stop on SIGTERM at any phase."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from psd_jax import sharding
from psd_jax.evaluation import embed, run as evaluation
from psd_jax.persistence import checkpointing, layout
from psd_jax.training import batch as batch_lib, flops as flops_lib, guard, metrics
from psd_jax.training import mfu as mfu_lib, step


class Preempted(Exception):
    """SIGTERM stopped the run; its message says what was saved. Rerunning the command resumes
    it (psd_jax.main exits with PREEMPTED_EXIT_CODE so that a scheduler requeues it)."""


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as a process killed by SIGTERM reports


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


WATCHED = ('skipped', 'skipped_in_a_row', 'skipped_total', 'loss', 'grad_norm', 'update_ratio')


@dataclasses.dataclass
class Loop:
    """Steps, with metrics every `train.log_every` steps (step time measured between logs,
    excluding saves and evaluations), evaluations every `train.eval_every`, checkpoints every
    `train.checkpoint_every` (postponed while steps are being skipped), the guard's verdict on
    every step (read one step late, so the device never waits for the host), and on SIGTERM a
    checkpoint and a clean stop (`preempted`: the run's flag)."""
    config: ml_collections.ConfigDict
    setup: step.StepSetup
    spec: dict
    train_step: Callable
    flops: float  # XLA's count per device (hfu)
    ckpt: checkpointing.Checkpointer
    writer: metrics.MetricsWriter
    tokenizer: Callable
    workdir: epath.Path
    preempted: checkpointing.PreemptionFlag

    def __post_init__(self):
        self.config_dict = json.loads(self.config.to_json_best_effort())
        self.tick, self.tick_step = time.perf_counter(), 0
        self.last: dict[str, float] = {}  # the last logged metrics
        self.pending: tuple[int, dict] | None = None  # a step's metrics not yet watched
        self.watched = 0  # the last step the guard saw
        self.in_a_row, self.trouble = 0, (0, '')  # (first skipped step of a streak, why)
        self.batch: dict | None = None  # the last global batch (to try a checkpoint on)
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
        """Steps from `start` to train.steps; returns (state, whether SIGTERM stopped it)."""
        self.tick, self.tick_step = time.perf_counter(), start
        for done in range(start + 1, self.config.train.steps + 1):
            batch = next(iterator)
            self.profile(done, 'start')
            self.batch = to_global(batch, self.spec, self.setup.mesh)
            with jax.transfer_guard(self.config.train.transfer_guard):  # explicit copies only
                state, step_metrics = self.train_step(state, self.batch)
            self.watch()  # the previous step's verdict, read while this one runs
            self.pending = (done, step_metrics)
            self.profile(done, 'stop', state)
            self.log(done, step_metrics)
            if self.evaluate_if_due(done, state, iterator):
                return state, True
            if stop_here(self.preempted, done):
                self.watch()
                logging.warning('SIGTERM: checkpointing step %d and exiting', done)
                self.ckpt.save(done, state, iterator, self.config_dict, force=True)
                return state, True
            self.checkpoint_if_due(done, state, iterator)
        self.watch()
        return state, False

    def watch(self) -> None:
        """The guard's verdict on the pending step (guard.TrainingDiverged past the policy):
        one warning when a streak of skipped steps begins."""
        if self.pending is None or self.pending[0] <= self.watched:
            return
        done, step_metrics = self.pending
        m = {k: float(v) for k, v in jax.device_get(
            {k: step_metrics[k] for k in WATCHED}).items()}
        self.watched, self.in_a_row = done, int(m['skipped_in_a_row'])
        if m['skipped'] and self.in_a_row == 1:
            self.trouble = (done, guard.why_skipped(m, self.config.train.max_update_ratio))
            logging.warning('step %d was not applied: %s', done, self.trouble[1])
        train = self.config.train
        if guard.exceeded(self.in_a_row, int(m['skipped_total']), train.nonfinite,
                          train.nonfinite_limit):
            raise guard.TrainingDiverged(self.diverged(done, int(m['skipped_total'])))

    def diverged(self, done: int, total: int) -> str:
        """The stop message: the newest checkpoint saved before the trouble began that gives
        finite embeddings on the last training batch (or that none does)."""
        began = self.trouble[0] if self.in_a_row else done
        self.ckpt.wait()
        steps = sorted(self.ckpt.manager.all_steps(), reverse=True)
        before = [s for s in steps if s < began]
        good = next((s for s in before if self.gives_finite_embeddings(s)), None)
        newer = sorted(s for s in steps if s >= began)
        train = self.config.train
        return guard.diverged_message(done, self.in_a_row, total, self.trouble[1] or 'a skipped '
                                      'step', train.nonfinite, train.nonfinite_limit, good, newer,
                                      len(before))

    def gives_finite_embeddings(self, at: int) -> bool:
        """Whether checkpoint `at` restores, its parameters are finite and its image and text
        embeddings of the last training batch are finite."""
        try:
            abstract, to_current = layout.restore_plan(
                self.setup, self.config.param_sharding, self.ckpt.restore_config(at))
            state = to_current(self.ckpt.restore(abstract, None, at)[0])
        except Exception as e:  # noqa: BLE001 -- a checkpoint that does not restore is not good
            logging.warning('checkpoint %d does not restore (%s)', at, str(e).splitlines()[0])
            return False
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        fns = embed.embed_fns(self.setup.model, self.setup.mesh)
        arrays = [*jax.tree.leaves(state.params), fns['image'](variables, self.batch['image']),
                  fns['text'](variables, self.batch['text'])]
        return all(bool(jax.numpy.isfinite(x).all()) for x in arrays)

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

    def evaluate_if_due(self, done: int, state, iterator) -> bool:
        """Periodic evaluation (the final one belongs to `finish`). SIGTERM during it
        checkpoints this step instead of finishing it; returns whether that happened."""
        train = self.config.train
        if not (train.eval_every and done % train.eval_every == 0 and done != train.steps):
            return False
        try:
            with self.preempted.interruptible():
                self.writer.write(done, self.evaluate(state, done))
        except checkpointing.Interrupted:
            self.watch()
            logging.warning('SIGTERM during the evaluation at step %d: checkpointing step %d '
                            'and exiting', done, done)
            self.ckpt.save(done, state, iterator, self.config_dict, force=True)
            return True
        self.tick, self.tick_step = time.perf_counter(), done
        return False

    def checkpoint_if_due(self, done: int, state, iterator) -> None:
        """Periodic checkpoint (the final one belongs to `finish`): never of a run the guard
        stops, and postponed while the latest steps were skipped."""
        if done % self.config.train.checkpoint_every == 0:
            self.watch()
            if self.in_a_row:
                logging.warning('checkpoint %d postponed: the last %d step(s) were not applied',
                                done, self.in_a_row)
                return
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
        error or SIGTERM cannot cost it), then the evaluation; final_metrics.json holds the last
        logged metrics and what the evaluators gave, also when one of them failed (the error is
        raised after). Returns that dict."""
        steps = self.config.train.steps
        self.watch()
        if self.ckpt.latest_step() != steps:
            self.ckpt.save(steps, state, iterator, self.config_dict, force=True)
        self.ckpt.wait()
        logging.info('checkpoint %d committed in %s', steps, self.ckpt.directory)
        if self.preempted and jax.process_count() == 1:
            raise Preempted(f'SIGTERM during the final save: the final checkpoint {steps} is '
                            f'committed in {self.ckpt.directory}; run the same command again to '
                            'evaluate it')
        failure = None
        try:
            with self.preempted.interruptible():
                final = self.evaluate(state, steps)
        except evaluation.EvaluationFailed as e:
            final, failure = e.partial, e
        except checkpointing.Interrupted:
            raise Preempted(f'SIGTERM during the final evaluation: the final checkpoint '
                            f'{steps} is committed in {self.ckpt.directory}; run the same '
                            'command again to evaluate it') from None
        if final:
            self.writer.write(steps, final, replace=True)
        result = {**self.last, **final}
        if jax.process_index() == 0:
            (self.workdir / 'final_metrics.json').write_text(json.dumps(result, indent=1))
        if failure is not None:
            raise failure
        return result
