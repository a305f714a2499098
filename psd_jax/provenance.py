"""Where a measurement came from: the code's commit and the command, stored with every result
JSON so that a figure in the docs can be traced to the code that produced it."""

from __future__ import annotations

import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def commit() -> str:
    """The checkout's short commit, with '+' when tracked files other than stored results
    (benchmarks/results/, docs/results/, which the benchmarks themselves write) differ from it
    ('' outside a git checkout)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(['git', *args], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip()
        except OSError:
            return ''
    head = git('rev-parse', '--short', 'HEAD')
    return head + ('+' if head and git('status', '--porcelain', '--untracked-files=no', '--', '.',
                                              ':!benchmarks/results', ':!docs/results')
                   else '')


def machine() -> str:
    """The host in words, e.g. 'x86_64 CPU, 2 cores, Python 3.11.7' (accelerators are named by
    the benchmark itself, which knows whether it used them)."""
    return (f'{platform.machine()} CPU, {os.cpu_count()} cores, '
            f'Python {platform.python_version()}')


def record(program: str) -> dict:
    """{'command', 'commit', 'date', 'machine'} of this process: `program` followed by its
    arguments. Every results JSON starts with it (tests/test_results.py checks)."""
    return {'command': ' '.join([program, shlex.join(sys.argv[1:])]).strip(), 'commit': commit(),
            'date': time.strftime('%Y-%m-%d'), 'machine': machine()}
