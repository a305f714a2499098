"""The workdir's own files: the lock that keeps a second run out, and the record of the configs
the workdir has run with.

- `<workdir>/lock.json`: {host, pid, started} of the run that holds it (process 0 of a multi-host
  run). A second run refuses to start and names the holder; a lock whose process is gone from
  this host (kill -9, a crash) is stale and is taken over with a warning. A lock held on
  another host cannot be checked from here: remove the file once that run is gone.
- `<workdir>/config.json`: the config of the latest start, written only after the resume check
  passed; `<workdir>/config_history.jsonl`: one line per start (time, first step, the keys
  changed from the checkpoint's config, the whole config).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from typing import Any

from absl import logging
from etils import epath

LOCK = 'lock.json'
UNREADABLE = 'unreadable'  # _holder's answer for a lock file that holds no lock


class WorkdirLocked(ValueError):
    """Another live run holds the workdir."""


def _alive_here(pid: int) -> bool:
    """Whether process `pid` runs on this host (and is a Python process, so a recycled pid of
    another program does not keep a stale lock alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = epath.Path(f'/proc/{pid}/cmdline')
    return not cmdline.exists() or b'python' in cmdline.read_bytes()


class WorkdirLock:
    """Context manager holding `<workdir>/lock.json` for this process (`active=False`: a
    non-lead host, which takes no lock)."""

    def __init__(self, workdir: epath.Path, active: bool = True):
        self.path = epath.Path(workdir) / LOCK
        self.active = active
        self.held = False

    def _holder(self) -> dict | str | None:
        """The lock's holder; None when there is no lock; UNREADABLE when the file is empty,
        truncated or not a lock (a crash while writing it)."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError, OSError):
            return UNREADABLE
        return holder if isinstance(holder, dict) and 'pid' in holder else UNREADABLE

    def acquire(self) -> None:
        me = {'host': socket.gethostname(), 'pid': os.getpid(),
              'started': datetime.datetime.now().isoformat(timespec='seconds')}
        holder = self._holder()
        if holder == UNREADABLE:  # a run creating it writes it at once: look again, then
            time.sleep(1.0)       # treat it as stale
            holder = self._holder()
        if holder == UNREADABLE:
            logging.warning('%s is empty or unreadable (a run that crashed while taking it?): '
                            'treating it as stale and taking it over', self.path)
            self.path.unlink()
        elif holder is not None:
            if holder.get('host') != me['host']:
                raise WorkdirLocked(
                    f'{self.path.parent} is in use by pid {holder.get("pid")} on host '
                    f'{holder.get("host")} since {holder.get("started")}; wait for it to end, '
                    f'use another --workdir, or remove {self.path} if that run is gone')
            if _alive_here(int(holder.get('pid', -1))):
                raise WorkdirLocked(
                    f'{self.path.parent} is in use by pid {holder["pid"]} on this host '
                    f'({holder["host"]}) since {holder.get("started")}; wait for it to end or '
                    'use another --workdir')
            logging.warning('%s: taking over a stale lock of pid %s (started %s), whose '
                            'process is gone', self.path.parent, holder.get('pid'),
                            holder.get('started'))
            self.path.unlink()
        self._create(json.dumps(me))
        self.held = True

    def _create(self, text: str) -> None:
        if '://' in str(self.path):  # object stores have no exclusive create: best effort
            self.path.write_text(text)
            return
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another run took it between our check and now
            raise WorkdirLocked(f'{self.path.parent} was locked by another run just now: '
                                f'{self._holder()}') from None
        with os.fdopen(fd, 'w') as f:
            f.write(text)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if isinstance(holder, dict) and holder.get('pid') == os.getpid():
                self.path.unlink()
            self.held = False

    def __enter__(self) -> 'WorkdirLock':
        if self.active:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def record_config(workdir: epath.Path, config: dict, start_step: int,
                  changed: dict[str, tuple[Any, Any]]) -> None:
    """Write config.json and append this start to config_history.jsonl (process 0 only)."""
    workdir = epath.Path(workdir)
    (workdir / 'config.json').write_text(json.dumps(config, indent=1, default=str))
    line = {'started': datetime.datetime.now().isoformat(timespec='seconds'),
            'from_step': start_step,
            'changed': {k: {'old': a, 'new': b} for k, (a, b) in changed.items()},
            'config': config}
    append_line(workdir / 'config_history.jsonl', json.dumps(line, default=str))


def append_line(path: epath.Path, line: str) -> None:
    """Append one line: a real append on a local disk (a kill loses at most this line); object
    stores (gs://) cannot append, so there the file is rewritten whole."""
    path = epath.Path(path)
    if '://' in str(path):
        previous = path.read_text() if path.exists() else ''
        path.write_text(previous + line + '\n')
        return
    with open(path, 'a') as f:
        f.write(line + '\n')
        f.flush()
        os.fsync(f.fileno())
