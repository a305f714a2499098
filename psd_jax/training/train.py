"""A run from start to end: mesh -> data -> state (fresh, or resumed after the checks) -> compiled
step -> the step loop (psd_jax/training/loop.py: metrics, checkpoints, evaluations, the guard)
-> final checkpoint and evaluation. `train_and_evaluate` reads as that sequence; each part is a
named function below it. SIGTERM at any phase ends in Preempted, whose message says what was
saved."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import jax
import ml_collections
from absl import logging
from etils import epath

from psd_jax import config as config_lib, pretrained, sharding
from psd_jax.data import datasets
from psd_jax.data.from_config import make_tokenizer, training_loader, training_source
from psd_jax.evaluation import run as evaluation
from psd_jax.persistence import checkpointing, layout, resume_rules
from psd_jax.persistence import workdir as workdir_lib
from psd_jax.training import metrics, mfu as mfu_lib, step
from psd_jax.training.loop import PREEMPTED_EXIT_CODE, Loop, Preempted  # noqa: F401 (main's)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (resuming from `workdir` when it holds a checkpoint) and evaluate; returns the last
    logged metrics including the final evaluation. Raises Preempted after SIGTERM (whatever the
    phase: its message says what was saved), guard.TrainingDiverged when the run diverged (its
    last good checkpoint stays). A run that already finished returns its final metrics."""
    config_lib.validate(config)
    workdir = epath.Path(workdir)  # a local path or gs://... (with gcsfs installed)
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    # one host: SIGTERM is ours; several: JAX's preemption service owns it
    with workdir_lib.WorkdirLock(workdir, active=lead), checkpointing.PreemptionFlag(
            install=jax.process_count() == 1) as preempted:
        run = Run(config, workdir)
        try:
            with preempted.interruptible():  # nothing new to save while starting
                state, start, iterator = run.start()
                done = finished_already(workdir, config.train.steps, start, lead)
                if done is not None:
                    return done
                train_step, flops = compile_step(run.setup, run.shardings, run.spec)
            run.writer = metrics.MetricsWriter(
                workdir, total_steps=config.train.steps, start_step=start,
                tensorboard=config.metrics.tensorboard,
                wandb_project=config.metrics.wandb_project, config=config.to_dict(),
                active=lead)
            loop = Loop(config, run.setup, run.spec, train_step, flops, run.ckpt, run.writer,
                        run.tokenizer, workdir, preempted)
            state, stopped = loop.run(state, start, iterator)
            if stopped:
                raise Preempted(f'preempted: checkpointed step {run.ckpt.latest_step()} of '
                                f'{workdir}; run the same command again to resume')
            last = loop.finish(state, iterator)
        except checkpointing.Interrupted:
            newest = run.ckpt.latest_step() if run.ckpt else None
            raise Preempted('SIGTERM while starting: nothing new was saved (' + (
                f'the newest checkpoint is step {newest}' if newest is not None
                else 'no checkpoint yet') + '); run the same command again') from None
        finally:
            close_quietly(run.ckpt, run.writer)
    if lead:
        metrics.plot(workdir)
    return last


class Run:
    """What a run is made of before its first step: mesh, tokenizer, training data, step
    setup, checkpointer; `start` builds them and gives the state to train from."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: epath.Path):
        self.config, self.workdir = config, workdir
        self.ckpt: checkpointing.Checkpointer | None = None
        self.writer: metrics.MetricsWriter | None = None

    def start(self) -> tuple[step.TrainState, int, Any]:
        """(state, first step, data iterator): the newest readable checkpoint's or a fresh
        one (restore_or_init)."""
        config = self.config
        mesh = sharding.make_mesh(config.mesh.to_dict())
        config_lib.check_global_batch(config, mesh)  # before any data is read or prepared
        logging.info('%s', sharding.describe(mesh))
        self.tokenizer = make_tokenizer(config)
        config_lib.check_own_data(config)
        source = training_source(config)
        evaluation.check_evaluators(config)  # an evaluation error must not wait for the end
        self.setup = config_lib.step_setup(config, mesh, dataset_size=len(source))
        self.spec = step.batch_spec(self.setup, config.data.global_batch)

        def data(start_batch: int = 0) -> Iterator[dict]:
            return training_loader(config, source, self.tokenizer, self.spec,
                                   self.setup.repeated_pairs, start_batch)

        self.shardings = step.state_shardings(self.setup, config.param_sharding)
        self.ckpt = checkpointing.Checkpointer(self.workdir, config.train.keep_checkpoints,
                                               config.train.keep_every)
        self.ckpt.dataset = datasets.identity(source)
        return restore_or_init(config, self.setup, self.shardings, self.ckpt, data,
                               self.workdir)


def finished_already(workdir: epath.Path, steps: int, start: int,
                     lead: bool) -> dict[str, float] | None:
    """The final metrics of a run that already trained to `steps` and evaluated (rerunning it
    does nothing, and logs nothing twice); a run that goes on training loses its older
    final_metrics.json (it describes a shorter run)."""
    final = workdir / 'final_metrics.json'
    if not final.exists():
        return None
    if start < steps:
        if lead:
            final.unlink()
        return None
    logging.info('the run is complete (step %d of %d); its final metrics are in %s (python -m '
                 'psd_jax.evaluate evaluates a checkpoint again)', start, steps, final)
    return json.loads(final.read_text())


def close_quietly(ckpt: checkpointing.Checkpointer | None, writer) -> None:
    """Close the checkpointer (waiting for its pending saves to commit) and the writer on every
    exit path; a failure here is logged, not raised over the error that ended the run."""
    for name, closer in (('checkpointer', ckpt.close if ckpt else None),
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
    (psd_jax/persistence/resume_rules.py): a change to a key that defines the run is refused
    by name, and nothing is written; so is a change of the training data (its identity, saved
    with each checkpoint) unless train.resume_allow_changes lists 'data'. A checkpoint written
    by another number of hosts holds per-host data positions for another split of the batches,
    and one of other data positions in other data: then the data restarts at its global
    batch."""
    config_dict = json.loads(config.to_json_best_effort())
    changed: dict = {}

    def check(saved: dict, saved_data: dict | None, at: int) -> bool:
        changed.update(resume_rules.check_resume(saved, config_dict, at, str(ckpt.directory)))
        data_change = resume_rules.check_data(saved_data, ckpt.dataset, at, config_dict)
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


