"""Orbax checkpoints of the train state, the grain iterator position and the config.

Asynchronous saves, `max_to_keep` plus keep-every-N; restore onto any mesh (the target
shardings come from the new run); the latest checkpoint in a workdir is found by itself.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain.python as grain
from etils import epath
import jax
import orbax.checkpoint as ocp

from psd_jax.step import TrainState


def _to_saveable(state: TrainState) -> TrainState:
    return state.replace(rng=jax.random.key_data(state.rng))


class Checkpointer:
    """Save / restore {state, data iterator, config} under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | epath.PathLike, max_to_keep: int = 3, keep_every: int = 0,
                 asynchronous: bool = True):
        workdir = epath.Path(workdir)
        if '://' not in str(workdir):
            workdir = epath.Path(os.path.abspath(workdir))
        self.directory = workdir / 'checkpoints'
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every or None,
            enable_async_checkpointing=asynchronous, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=('state', 'data', 'config', 'hosts'))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, iterator: Any, config: dict,
             force: bool = False) -> bool:
        """Start an (asynchronous) save of this step; returns whether one was started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            data=grain.PyGrainCheckpointSave(iterator),
            config=ocp.args.JsonSave(config),
            hosts=ocp.args.JsonSave({'process_count': jax.process_count()}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: TrainState, iterator: Any,
                step: int | None = None) -> tuple[TrainState, int]:
        """Restore into `abstract_state`'s shardings (any mesh) and move `iterator` to the saved
        position (None: the state only). Raises FileNotFoundError naming the directory when it
        holds no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {self.directory}')
        key_shape = jax.eval_shape(jax.random.key_data, abstract_state.rng)
        target = abstract_state.replace(rng=jax.ShapeDtypeStruct(
            key_shape.shape, key_shape.dtype, sharding=abstract_state.rng.sharding))
        items = {'state': ocp.args.StandardRestore(target)}
        if iterator is not None:
            items['data'] = grain.PyGrainCheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored['state']
        return state.replace(rng=jax.random.wrap_key_data(state.rng)), step

    def saved_process_count(self, step: int | None = None) -> int | None:
        """How many hosts wrote this checkpoint (None: not recorded). The data position of
        each host can be restored only onto as many hosts."""
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / 'hosts').exists():
            return None
        return int(self.manager.restore(step, args=ocp.args.Composite(
            hosts=ocp.args.JsonRestore()))['hosts']['process_count'])

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {self.directory}')
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))['config']

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM (preemption); the loop checkpoints at the next step boundary and exits."""

    def __init__(self, install: bool = True):
        self.event = threading.Event()
        self._previous = None
        self._install = install

    def __enter__(self) -> 'PreemptionFlag':
        if self._install and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def __bool__(self) -> bool:
        return self.event.is_set()
