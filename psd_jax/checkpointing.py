"""Orbax checkpoints of the train state, the grain iterator position and the config.

Asynchronous saves, `max_to_keep` plus keep-every-N; restore onto any mesh (the target
shardings come from the new run); the latest checkpoint in a workdir is found by itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

import grain.python as grain
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from psd_jax.step import TrainState


def _to_saveable(state: TrainState) -> TrainState:
    return state.replace(rng=jax.random.key_data(state.rng))


def _bits(x: jax.Array) -> jax.Array:
    """The bit pattern of every element as uint32 (bool, 8-, 16- and 32-bit types)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint(tree: Any) -> list[jax.Array]:
    """Per leaf, sum_i bits_i * (2 i + 1) mod 2^32: exact on any mesh (integer sums do not
    depend on their order) and changed by any flipped bit or swapped pair of elements."""
    out = []
    for x in jax.tree.leaves(tree):
        weights = 2 * jnp.arange(x.size, dtype=jnp.uint32) + 1
        out.append(jnp.sum(_bits(x).ravel() * weights, dtype=jnp.uint32))
    return out


def fingerprint(state: TrainState) -> list[int]:
    """The saved form of `state`, one uint32 checksum per leaf (see _fingerprint)."""
    return [int(x) for x in jax.device_get(_fingerprint(_to_saveable(state)))]


class CorruptCheckpoint(ValueError):
    """A checkpoint restored without error but its arrays differ from what was saved."""


class Checkpointer:
    """Save / restore {state, data iterator, config} under `<workdir>/checkpoints`.

    Retention is ours, not Orbax's: the newest `max_to_keep` checkpoints (and every
    `keep_every`-th step) are kept, and older ones are deleted only once the newest has been
    committed and reads back (its config and its fingerprint), so a save that fails or is
    damaged never costs the checkpoint before it."""

    def __init__(self, workdir: str | epath.PathLike, max_to_keep: int = 3, keep_every: int = 0,
                 asynchronous: bool = True):
        workdir = epath.Path(workdir)
        if '://' not in str(workdir):
            workdir = epath.Path(os.path.abspath(workdir))
        self.directory = workdir / 'checkpoints'
        self.max_to_keep, self.keep_every = max_to_keep, keep_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=asynchronous, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=('state', 'data', 'config', 'hosts',
                                                         'integrity'))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, iterator: Any, config: dict,
             force: bool = False) -> bool:
        """Start an (asynchronous) save of this step; returns whether one was started. The
        previous save has committed by then (Orbax waits for it): older checkpoints are pruned
        first if it reads back."""
        self.manager.wait_until_finished()
        self.prune()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            data=grain.PyGrainCheckpointSave(iterator),
            config=ocp.args.JsonSave(config),
            hosts=ocp.args.JsonSave({'process_count': jax.process_count()}),
            integrity=ocp.args.JsonSave({'fingerprint': fingerprint(state)}))
        started = self.manager.save(step, args=args, force=force)
        if started:
            logging.info('checkpoint %d: saving to %s', step, self.directory)
        return started

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
        if (self.directory / str(step) / 'integrity').exists():
            items['integrity'] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored['state'].replace(rng=jax.random.wrap_key_data(restored['state'].rng))
        if 'integrity' in items:
            saved, now = restored['integrity']['fingerprint'], fingerprint(state)
            bad = [keystr for (keystr, _), a, b in zip(
                jax.tree_util.tree_flatten_with_path(_to_saveable(state))[0], saved, now)
                if a != b]
            if bad or len(saved) != len(now):
                raise CorruptCheckpoint(
                    f'checkpoint {step}: {len(bad)} arrays differ from what was saved (first: '
                    f'{jax.tree_util.keystr(bad[0]) if bad else "leaf count"}): the files were '
                    'damaged after writing')
        return state, step

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

    def restore_newest_readable(self, abstract_for: Callable[[dict], TrainState],
                                fresh_iterator: Callable[[], Any],
                                check_config: Callable[[dict, int], None]
                                ) -> tuple[TrainState, int, Any, dict]:
        """The newest checkpoint that restores: (state, step, the data iterator at its
        position, or None when it was written by another number of hosts, whose per-host
        positions do not apply, its config). `check_config(saved_config, step)` runs before
        the state is read and may raise (a forbidden config change); the state is restored
        into `abstract_for(saved_config)`. A checkpoint that fails to restore (a
        missing item, a damaged file) is reported with the reason and moved aside to
        `<workdir>/damaged_checkpoints/` (process 0), so the run can write that step again;
        when none restores, FileNotFoundError lists each one tried and why."""
        tried = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                config = self.restore_config(step)
            except Exception as e:  # noqa: BLE001 -- any failure: try the previous one
                tried.append(self._report(step, e))
                continue
            check_config(config, step)
            iterator = None
            try:
                if self.saved_process_count(step) in (None, jax.process_count()):
                    iterator = fresh_iterator()
                state, _ = self.restore(abstract_for(config), iterator, step)
            except Exception as e:  # noqa: BLE001
                tried.append(self._report(step, e))
                continue
            if tried:
                self._set_aside(step)
            return state, step, iterator, config
        raise FileNotFoundError(f'no checkpoint in {self.directory} can be restored; tried: '
                                + '; '.join(tried))

    def _report(self, step: int, error: Exception) -> str:
        first = str(error).splitlines()[0][:300] if str(error) else ''
        reason = f'{type(error).__name__}: {first}'
        logging.warning('checkpoint %d in %s cannot be restored (%s); trying the previous one',
                        step, self.directory, reason)
        return f'step {step} ({reason})'

    def _set_aside(self, good_step: int) -> None:
        """Move every checkpoint newer than `good_step` out of the checkpoint directory."""
        if jax.process_index() == 0:
            aside = self.directory.parent / 'damaged_checkpoints'
            aside.mkdir(parents=True, exist_ok=True)
            for step in self.manager.all_steps():
                if step > good_step:
                    target = aside / f'{step}-{int(time.time())}'
                    (self.directory / str(step)).rename(target)
                    logging.warning('moved the unreadable checkpoint %d to %s', step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices('damaged checkpoints set aside')
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def prune(self) -> list[int]:
        """Delete the checkpoints retention no longer keeps, provided the newest one reads
        back; returns the steps deleted (process 0 decides, every host deletes through
        Orbax)."""
        steps = sorted(self.manager.all_steps())
        keep = set(steps[-self.max_to_keep:])
        keep |= {s for s in steps if self.keep_every and s % self.keep_every == 0}
        doomed = [s for s in steps if s not in keep]
        if not doomed:
            return []
        try:
            self.restore_config(steps[-1])
            if (self.directory / str(steps[-1]) / 'integrity').exists():
                self.manager.restore(steps[-1], args=ocp.args.Composite(
                    integrity=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            logging.warning('checkpoint %d does not read back (%s): keeping the older ones %s',
                            steps[-1], e, doomed)
            return []
        for step in doomed:
            self.manager.delete(step)
        return doomed

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.prune()
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
