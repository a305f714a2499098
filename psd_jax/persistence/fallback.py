"""Finding the newest checkpoint that restores on every host, and saying in one line why the
others did not.

Every host reads on its own (no collective can wait on a host that failed) and the verdicts
are combined: damage seen by any host (a missing item or file, a decode failure, a
fingerprint that differs) makes every host try the previous checkpoint, and once one restores
everywhere, the damaged ones are moved aside to `<workdir>/damaged_checkpoints/` by process 0
between barriers all hosts reach, one warning line each (the checkpoint, the cause, where it
went). A transient I/O error is retried (`READ_TRIES`) and then stops every host with
CheckpointUnavailable, setting nothing aside. When none restores, one error names the workdir,
each checkpoint's cause and what to do.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
from absl import logging

from psd_jax.persistence.checkpointing import CorruptCheckpoint

if TYPE_CHECKING:
    from psd_jax.persistence.checkpointing import Checkpointer


class CheckpointUnavailable(OSError):
    """A checkpoint could not be read for a reason that is not damage (storage that did not
    answer): every host stops, nothing is set aside."""


class DataChanged(ValueError):
    """The data position saved in a checkpoint does not fit the training data any more: the
    data changed, the checkpoint did not."""


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


def _chain(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while error is not None and error not in out and len(out) < 8:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _short(error: BaseException) -> str:
    """The first line of an error without TensorStore's multi-line spec, at most 160 chars; a
    TensorStore read error as '<array>: <what>'."""
    text = str(error).split(' See full TensorStore details')[0]
    text = text.splitlines()[0] if text else type(error).__name__
    found = re.search(r'Error reading "([^"]+)".*?": (.+)$', text)
    if found:
        text = f'{found.group(1).rsplit("/", 1)[0]}: {found.group(2)}'
    return text[:160]


def cause(error: BaseException) -> str:
    """What is wrong with a checkpoint, in a few words a user can act on: 'missing file',
    'damaged data file', 'unreadable metadata' or 'fingerprint mismatch', then the most
    specific message of the error's chain."""
    chain = _chain(error)
    texts = ' '.join(f'{type(e).__name__}: {e}' for e in chain)
    if isinstance(error, CorruptCheckpoint):
        kind = 'fingerprint mismatch'
    elif any(w in texts for w in ('Truncated', 'DATA_LOSS', 'FAILED_PRECONDITION', 'corrupt',
                                  'checksum', 'Error reading')):
        kind = 'damaged data file'
    elif any(isinstance(e, MISSING) for e in chain) or any(
            w in texts for w in ('NOT_FOUND', 'No such file', 'does not exist', 'not found')):
        kind = 'missing file'
    elif any(isinstance(e, (json.JSONDecodeError, KeyError)) for e in chain) or (
            'metadata' in texts.lower()):
        kind = 'unreadable metadata'
    else:
        kind = 'unreadable'
    detail = next((_short(e) for e in reversed(chain) if len(_short(e)) >= 20), _short(error))
    return f'{kind}: {detail}'


def _allgather(values: list[int]) -> np.ndarray:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def newest_readable(ckpt: 'Checkpointer', abstract_for: Callable[[dict], Any],
                    fresh_iterator: Callable[[], Any],
                    check: Callable[[dict, dict | None, int], bool | None]
                    ) -> tuple[Any, int, Any, dict]:
    """(state, step, the data iterator at its saved position or None, its config) of the
    newest checkpoint of `ckpt` that restores on every host. `check(saved_config,
    saved_data_identity, step)` runs before the state is read and may raise (a forbidden
    change); it returns False when the saved data position must not be restored (the data
    changed deliberately). The iterator is also None for a checkpoint written by another number
    of hosts, whose per-host positions do not apply. The state is restored into
    `abstract_for(saved_config)`."""
    tried: dict[int, str] = {}
    damaged: list[int] = []
    for step in _agreed_steps(ckpt):
        config, error = _read_retrying(ckpt, lambda: ckpt.restore_config(step))
        if not _agree(ckpt, step, error, tried):
            damaged.append(step)
            continue
        identity, error = _read_retrying(ckpt, lambda: ckpt.restore_dataset(step))
        if not _agree(ckpt, step, error, tried):
            damaged.append(step)
            continue
        keep_position = check(config, identity, step) is not False

        def read_state():
            iterator = None
            if keep_position and ckpt.saved_process_count(step) in (None, jax.process_count()):
                iterator = fresh_iterator()
            return ckpt._read_state(abstract_for(config), iterator, step), iterator

        read, error = _read_retrying(ckpt, read_state)
        if error is not None and 'does not match dataloader' in str(error):
            raise DataChanged(
                f'the training data changed since checkpoint {step} of {ckpt.directory}: '
                f'{str(error).splitlines()[0]} The checkpoint is intact. Train on the data it '
                'was written with, or use a new --workdir')
        if not _agree(ckpt, step, error, tried):
            damaged.append(step)
            continue
        (state, saved), iterator = read
        try:  # a collective computation: every host gets here and gets the same answer
            ckpt._verify(state, saved, step)
        except CorruptCheckpoint as e:
            tried[step] = cause(e)
            damaged.append(step)
            continue
        if damaged:
            _set_aside(ckpt, damaged, tried, step)
        return state, step, iterator, config
    causes = '; '.join(f'checkpoint {s}: {why}' for s, why in tried.items())
    raise FileNotFoundError(
        f'no checkpoint in {ckpt.directory} can be restored ({causes}). Nothing was moved or '
        f'deleted. To start this run again from step 0, move {ckpt.directory} aside (or use a '
        'new --workdir); to keep trying them, restore the files from a copy')


def _agreed_steps(ckpt: 'Checkpointer') -> list[int]:
    """The checkpoint steps every host sees, newest first (hosts whose listings of shared
    storage disagree try the same steps in the same order; a step some host does not see is
    skipped with a warning, never set aside)."""
    mine = sorted(ckpt.manager.all_steps(), reverse=True)
    if jax.process_count() == 1:
        return mine
    longest = int(np.max(_allgather([len(mine)])))
    padded = np.full((max(longest, 1),), -1, np.int64)
    padded[:len(mine)] = mine
    seen = _allgather(list(padded)).reshape(jax.process_count(), -1)
    agreed = [s for s in mine if all(s in row for row in seen)]
    for step in sorted(set(mine) - set(agreed), reverse=True):
        logging.warning('checkpoint %d in %s is not seen by every host: skipped', step,
                        ckpt.directory)
    return agreed


def _read_retrying(ckpt: 'Checkpointer', read: Callable[[], Any]
                   ) -> tuple[Any, Exception | None]:
    """(read(), None), or (None, the error) once it failed for good: a transient error
    (is_transient) is retried READ_TRIES times with a doubling pause."""
    for attempt in range(READ_TRIES):
        try:
            return read(), None
        except Exception as e:  # noqa: BLE001 -- classified by the caller
            if not is_transient(e) or attempt == READ_TRIES - 1:
                return None, e
            logging.warning('reading a checkpoint in %s failed (%s: %s); retrying in %.0f s',
                            ckpt.directory, type(e).__name__, _short(e),
                            READ_PAUSE_S * 2 ** attempt)
            time.sleep(READ_PAUSE_S * 2 ** attempt)
    raise AssertionError('unreachable')


def _agree(ckpt: 'Checkpointer', step: int, error: Exception | None,
           tried: dict[int, str]) -> bool:
    """Combine every host's verdict on `step`: True when all read it; False (the cause
    recorded in `tried`) when any host found damage; CheckpointUnavailable on every host when
    a host's read failed transiently and none found damage."""
    mine = 0 if error is None else (2 if is_transient(error) else 1)
    verdicts = [mine]
    if jax.process_count() > 1:
        verdicts = [int(v) for v in _allgather([mine]).reshape(-1)]
    if not any(verdicts):
        return True
    hosts = [i for i, v in enumerate(verdicts) if v == 1]
    if hosts:
        tried[step] = cause(error) if mine == 1 else f'damaged as read by host(s) {hosts}'
        return False
    transient = [i for i, v in enumerate(verdicts) if v == 2]
    raise CheckpointUnavailable(
        f'checkpoint {step} in {ckpt.directory} could not be read by host(s) {transient} '
        f'after {READ_TRIES} tries (' + (f'{type(error).__name__}: {_short(error)}'
                                         if mine == 2 else 'a transient I/O error') +
        '); it is not damaged as far as any host can tell, so nothing was set aside: run '
        'the same command again once the storage answers')


def _set_aside(ckpt: 'Checkpointer', steps: list[int], causes: dict[int, str],
               restored: int) -> None:
    """Move the damaged checkpoints `steps` out of the checkpoint directory, one warning line
    each: once, by process 0, between two barriers that every process reaches (they all
    agreed on `steps`)."""
    multi = jax.process_count() > 1
    if multi:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f'set aside checkpoints {steps}')
    if jax.process_index() == 0:
        aside = ckpt.directory.parent / 'damaged_checkpoints'
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = aside / f'{step}-{int(time.time())}'
            (ckpt.directory / str(step)).rename(target)
            logging.warning('checkpoint %d in %s cannot be restored (%s): moved to %s; '
                            'resuming from checkpoint %d', step, ckpt.directory,
                            causes.get(step, 'empty directory'), target, restored)
    if multi:
        multihost_utils.sync_global_devices(f'checkpoints {steps} set aside')
    ckpt.manager.reload()
