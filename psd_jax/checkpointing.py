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
import numpy as np
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


class CheckpointUnavailable(OSError):
    """A checkpoint could not be read for a reason that is not damage (storage that did not
    answer): every host stops, nothing is set aside."""


ITEMS = ('state', 'data', 'config', 'hosts', 'integrity')
READ_TRIES = 3  # reads of a checkpoint that fail transiently, before giving up
READ_PAUSE_S = 2.0  # the pause after the first failed read; doubled after each
# OSErrors that say the data is not there (damage), not that the storage failed to answer
MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
TRANSIENT_WORDS = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'timed out', 'Connection reset',
                   'Temporary failure', 'try again', '503 ', '429 ')


def is_transient(error: BaseException) -> bool:
    """Whether a failed read may succeed if tried again (storage that did not answer: a
    timeout, a reset connection, a service unavailable) rather than show damage."""
    if isinstance(error, CheckpointUnavailable):
        return True
    if isinstance(error, OSError) and not isinstance(error, MISSING):
        return True
    text = str(error)
    return any(word in text for word in TRANSIENT_WORDS)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:300] if str(error) else ''


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
                                             item_names=ITEMS)
        self._reader = None  # this process's own reader (see _read)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, iterator: Any, config: dict,
             force: bool = False) -> bool:
        """Start an (asynchronous) save of this step; returns whether one was started. The
        previous save has committed by then (Orbax waits for it): older checkpoints are pruned
        first if it reads back."""
        self.manager.wait_until_finished()
        self.prune()
        items = dict(
            state=ocp.args.StandardSave(_to_saveable(state)),
            config=ocp.args.JsonSave(config),
            hosts=ocp.args.JsonSave({'process_count': jax.process_count()}),
            integrity=ocp.args.JsonSave({'fingerprint': fingerprint(state)}))
        if iterator is not None:  # None: the state alone (a run without a data position)
            items['data'] = grain.PyGrainCheckpointSave(iterator)
        args = ocp.args.Composite(**items)
        started = self.manager.save(step, args=args, force=force)
        if started:
            logging.info('checkpoint %d: saving to %s', step, self.directory)
        return started

    def restore(self, abstract_state: TrainState, iterator: Any,
                step: int | None = None) -> tuple[TrainState, int]:
        """Restore into `abstract_state`'s shardings (any mesh) and move `iterator` to the saved
        position (None: the state only). Raises FileNotFoundError naming the directory when it
        holds no checkpoint, CorruptCheckpoint when the arrays differ from what was saved."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {self.directory}')
        state, saved = self._read_state(abstract_state, iterator, step)
        self._verify(state, saved, step)
        return state, step

    def _read_state(self, abstract_state: TrainState, iterator: Any, step: int
                    ) -> tuple[TrainState, list[int] | None]:
        """(the state, its saved fingerprint or None) of `step`, read by this host alone (the
        reader has no barrier, so a host whose read fails never leaves the others waiting)."""
        key_shape = jax.eval_shape(jax.random.key_data, abstract_state.rng)
        target = abstract_state.replace(rng=jax.ShapeDtypeStruct(
            key_shape.shape, key_shape.dtype, sharding=abstract_state.rng.sharding))
        items = {'state': ocp.args.StandardRestore(target)}
        if iterator is not None:
            items['data'] = grain.PyGrainCheckpointRestore(iterator)
        if (self.directory / str(step) / 'integrity').exists():
            items['integrity'] = ocp.args.JsonRestore()
        restored = self._read(step, items)
        state = restored['state'].replace(rng=jax.random.wrap_key_data(restored['state'].rng))
        saved = restored['integrity']['fingerprint'] if 'integrity' in items else None
        return state, saved

    def _verify(self, state: TrainState, saved: list[int] | None, step: int) -> None:
        """CorruptCheckpoint when `state` differs from the fingerprint saved with it (a
        computation over the global arrays: every host runs it and gets the same answer)."""
        if saved is None:
            return
        now = fingerprint(state)
        bad = [keystr for (keystr, _), a, b in zip(
            jax.tree_util.tree_flatten_with_path(_to_saveable(state))[0], saved, now)
            if a != b]
        if bad or len(saved) != len(now):
            raise CorruptCheckpoint(
                f'checkpoint {step}: {len(bad)} arrays differ from what was saved (first: '
                f'{jax.tree_util.keystr(bad[0]) if bad else "leaf count"}): the files were '
                'damaged after writing')

    def _read(self, step: int, items: dict) -> dict:
        """Restore `items` of `step` through a reader of this process alone (Orbax's restore
        ends in a barrier across hosts otherwise)."""
        if self._reader is None:
            options = ocp.CheckpointManagerOptions(  # it never saves (read_only would warn)
                create=False, max_to_keep=None, enable_async_checkpointing=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=jax.process_index(), active_processes={jax.process_index()},
                    barrier_sync_key_prefix=f'reader{jax.process_index()}'))
            self._reader = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=ITEMS)
        else:
            self._reader.reload()
        return self._reader.restore(step, args=ocp.args.Composite(**items))

    def saved_process_count(self, step: int | None = None) -> int | None:
        """How many hosts wrote this checkpoint (None: not recorded). The data position of
        each host can be restored only onto as many hosts."""
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / 'hosts').exists():
            return None
        return int(self._read(step, {'hosts': ocp.args.JsonRestore()})['hosts']['process_count'])

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {self.directory}')
        return self._read(step, {'config': ocp.args.JsonRestore()})['config']

    def restore_newest_readable(self, abstract_for: Callable[[dict], TrainState],
                                fresh_iterator: Callable[[], Any],
                                check_config: Callable[[dict, int], None]
                                ) -> tuple[TrainState, int, Any, dict]:
        """The newest checkpoint that restores on every host: (state, step, the data iterator
        at its position, or None when it was written by another number of hosts, whose
        per-host positions do not apply, its config). `check_config(saved_config, step)` runs
        before the state is read and may raise (a forbidden config change); the state is
        restored into `abstract_for(saved_config)`.

        Every host reads on its own (no collective can wait on a host that failed) and the
        verdicts are combined: damage seen by any host (a missing item or file, a decode
        failure, a fingerprint that differs) makes every host try the previous checkpoint,
        and once one restores everywhere, the damaged ones are moved aside to
        `<workdir>/damaged_checkpoints/` by process 0 between barriers all hosts reach. A
        transient I/O error is retried (`READ_TRIES`) and then stops every host with
        CheckpointUnavailable, setting nothing aside. When none restores, FileNotFoundError
        lists each one tried and why."""
        tried, damaged = [], []
        for step in self._agreed_steps():
            config, error = self._read_retrying(lambda: self.restore_config(step))
            if not self._agree(step, error, tried):
                damaged.append(step)
                continue
            check_config(config, step)

            def read_state():
                iterator = None
                if self.saved_process_count(step) in (None, jax.process_count()):
                    iterator = fresh_iterator()
                return self._read_state(abstract_for(config), iterator, step), iterator

            read, error = self._read_retrying(read_state)
            if not self._agree(step, error, tried):
                damaged.append(step)
                continue
            (state, saved), iterator = read
            try:  # a collective computation: every host gets here and gets the same answer
                self._verify(state, saved, step)
            except CorruptCheckpoint as e:
                tried.append(self._report(step, e))
                damaged.append(step)
                continue
            if damaged:
                self._set_aside(damaged)
            return state, step, iterator, config
        raise FileNotFoundError(f'no checkpoint in {self.directory} can be restored; tried: '
                                + '; '.join(tried))

    def _agreed_steps(self) -> list[int]:
        """The checkpoint steps every host sees, newest first (hosts whose listings of shared
        storage disagree try the same steps in the same order; a step some host does not see
        is skipped with a warning, never set aside)."""
        mine = sorted(self.manager.all_steps(), reverse=True)
        if jax.process_count() == 1:
            return mine
        from jax.experimental import multihost_utils
        longest = int(np.max(multihost_utils.process_allgather(np.asarray([len(mine)]))))
        padded = np.full((max(longest, 1),), -1, np.int64)
        padded[:len(mine)] = mine
        seen = np.asarray(multihost_utils.process_allgather(padded)).reshape(
            jax.process_count(), -1)
        agreed = [s for s in mine if all(s in row for row in seen)]
        for step in sorted(set(mine) - set(agreed), reverse=True):
            logging.warning('checkpoint %d in %s is not seen by every host: skipped', step,
                            self.directory)
        return agreed

    def _read_retrying(self, read: Callable[[], Any]) -> tuple[Any, Exception | None]:
        """(read(), None), or (None, the error) once it failed for good: a transient error
        (is_transient) is retried READ_TRIES times with a doubling pause."""
        for attempt in range(READ_TRIES):
            try:
                return read(), None
            except Exception as e:  # noqa: BLE001 -- classified by the caller
                if not is_transient(e) or attempt == READ_TRIES - 1:
                    return None, e
                logging.warning('reading a checkpoint in %s failed (%s: %s); retrying in %.0f s',
                                self.directory, type(e).__name__, _first_line(e),
                                READ_PAUSE_S * 2 ** attempt)
                time.sleep(READ_PAUSE_S * 2 ** attempt)
        raise AssertionError('unreachable')

    def _agree(self, step: int, error: Exception | None, tried: list[str]) -> bool:
        """Combine every host's verdict on `step`: True when all read it; False (recorded in
        `tried`) when any host found damage; CheckpointUnavailable on every host when a host's
        read failed transiently and none found damage."""
        mine = 0 if error is None else (2 if is_transient(error) else 1)
        if error is not None:
            self._report(step, error, log=mine == 1)
        verdicts = [mine]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            verdicts = [int(v) for v in np.asarray(multihost_utils.process_allgather(
                np.asarray([mine], np.int32))).reshape(-1)]
        if not any(verdicts):
            return True
        hosts = lambda code: [i for i, v in enumerate(verdicts) if v == code]  # noqa: E731
        if hosts(1):
            why = (f'{type(error).__name__}: {_first_line(error)}' if mine == 1
                   else f'damaged as read by host(s) {hosts(1)}')
            tried.append(f'step {step} ({why})')
            return False
        raise CheckpointUnavailable(
            f'checkpoint {step} in {self.directory} could not be read by host(s) {hosts(2)} '
            f'after {READ_TRIES} tries (' + (f'{type(error).__name__}: {_first_line(error)}'
                                             if mine == 2 else 'a transient I/O error') +
            '); it is not damaged as far as any host can tell, so nothing was set aside: run '
            'the same command again once the storage answers')

    def _report(self, step: int, error: Exception, log: bool = True) -> str:
        reason = f'{type(error).__name__}: {_first_line(error)}'
        if log:
            logging.warning('checkpoint %d in %s cannot be restored (%s); trying the previous '
                            'one', step, self.directory, reason)
        return f'step {step} ({reason})'

    def _set_aside(self, steps: list[int]) -> None:
        """Move the damaged checkpoints `steps` out of the checkpoint directory: once, by
        process 0, between two barriers that every process reaches (they all agreed on
        `steps`)."""
        multi = jax.process_count() > 1
        if multi:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f'set aside checkpoints {steps}')
        if jax.process_index() == 0:
            aside = self.directory.parent / 'damaged_checkpoints'
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / f'{step}-{int(time.time())}'
                (self.directory / str(step)).rename(target)
                logging.warning('moved the unreadable checkpoint %d to %s', step, target)
        if multi:
            multihost_utils.sync_global_devices(f'checkpoints {steps} set aside')
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
                self._read(steps[-1], {'integrity': ocp.args.JsonRestore()})
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
