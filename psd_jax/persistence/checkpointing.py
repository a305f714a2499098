"""Orbax checkpoints of the train state, the grain iterator position and the config.

Asynchronous saves, `max_to_keep` plus keep-every-N; restore onto any mesh (the target
shardings come from the new run); the latest checkpoint in a workdir is found by itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable

import grain.python as grain
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from psd_jax.training.step import TrainState


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


ITEMS = ('state', 'data', 'config', 'hosts', 'integrity', 'dataset')


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
        self.dataset: dict | None = None  # the training data's identity, saved with each

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
        if self.dataset is not None:
            items['dataset'] = ocp.args.JsonSave(self.dataset)
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
                                check: Callable[[dict, dict | None, int], bool | None]
                                ) -> tuple[TrainState, int, Any, dict]:
        """The newest checkpoint that restores on every host (psd_jax/persistence/fallback.py)."""
        from psd_jax.persistence import fallback
        return fallback.newest_readable(self, abstract_for, fresh_iterator, check)

    def restore_dataset(self, step: int) -> dict | None:
        """The identity of the training data saved with checkpoint `step` (None: a checkpoint
        written before it was recorded)."""
        if not (self.directory / str(step) / 'dataset').exists():
            return None
        return self._read(step, {'dataset': ocp.args.JsonRestore()})['dataset']

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


class Interrupted(BaseException):
    """SIGTERM arrived while the run was in an interruptible phase (starting up, evaluating):
    raised at once in the main thread (a BaseException, so that no library's `except
    Exception` swallows it)."""


class PreemptionFlag:
    """Set by SIGTERM (preemption). In the step loop the flag is only set, and the loop
    checkpoints at the next step boundary; inside `interruptible()` (start-up, evaluations)
    SIGTERM also raises Interrupted at once, since finishing that phase saves nothing."""

    def __init__(self, install: bool = True):
        self.event = threading.Event()
        self._previous = None
        self._install = install
        self._interrupt = False

    def _on_sigterm(self, *_):
        self.event.set()
        if self._interrupt:  # the raise may land where Python ignores exceptions (a finalizer
            self._again()    # or a gc callback): then the signal comes again
            raise Interrupted('SIGTERM')

    def _again(self, after_s: float = 1.0) -> None:
        def resend():
            if self._interrupt:
                os.kill(os.getpid(), signal.SIGTERM)
        timer = threading.Timer(after_s, resend)
        timer.daemon = True
        timer.start()

    @contextlib.contextmanager
    def interruptible(self):
        """Within: SIGTERM raises Interrupted (at once, or on entry when it came before)."""
        if self.event.is_set() and self._installed:
            raise Interrupted('SIGTERM')
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    @property
    def _installed(self) -> bool:
        return self._previous is not None

    def __enter__(self) -> 'PreemptionFlag':
        if self._install and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __bool__(self) -> bool:
        return self.event.is_set()
