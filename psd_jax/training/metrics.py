"""Where the numbers go: metrics.jsonl, TensorBoard (tensorboardX), optional Weights & Biases,
a progress bar or plain log lines, and a PNG plot at the end.

metrics.jsonl is appended a line at a time (a kill loses at most the line being written); on
GCS (gs://..., with gcsfs installed), which cannot append, it is rewritten whole at each log. The
plot is rendered locally, then copied.
"""

from __future__ import annotations

import json
import math
import pathlib
import tempfile
import sys
from typing import Any

from absl import logging
from etils import epath

from psd_jax.persistence.workdir import append_line


CONSOLE_KEYS = ('loss', 'clip', 'distill', 'alpha', 'images_per_s')
CONSOLE_SUFFIXES = ('/i2t_R@1', '/t2i_R@1', '/top1', '/accuracy', 'suite/average',
                    'robustness/effective_robustness')


def on_console(key: str) -> bool:
    """Whether a metric belongs on the console's one line per log (the rest goes to the
    files): the losses, speed, each evaluation's headline numbers and the suite average."""
    return key in CONSOLE_KEYS or key.endswith(CONSOLE_SUFFIXES)


class MetricsWriter:
    """One JSON line per logged step in <workdir>/metrics.jsonl, mirrored to TensorBoard."""

    def __init__(self, workdir: str | epath.PathLike, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, wandb_project: str = '', config: dict | None = None,
                 active: bool = True):
        self.workdir = epath.Path(workdir)
        self.active = active  # only process 0 writes
        self.path = self.workdir / 'metrics.jsonl'
        self._tb = self._wandb = self._bar = None
        if not active:
            return
        self._drop_after(start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.workdir / 'tensorboard'))
        if wandb_project:
            import wandb  # optional: pip install wandb
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(workdir),
                                     resume='allow')
        if sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit='step',
                             dynamic_ncols=True)

    def write(self, step: int, scalars: dict[str, Any], replace: bool = False) -> None:
        """Append one line for `step`; `replace`: first drop the lines of this step that hold
        only keys of `scalars` (a final evaluation run again writes its line once)."""
        if not self.active:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        if replace and self.path.exists():
            records = read_metrics(self.path, merge=False)
            kept = [r for r in records if not (r['step'] == step and set(r) - {'step'} <= set(
                clean))]
            if len(kept) != len(records):
                self.path.write_text(''.join(json.dumps(r) + '\n' for r in kept))
        append_line(self.path, json.dumps({'step': step, **clean}))
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k.replace('@', '_at_'), v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        brief = ' '.join(f'{k}={v:.4g}' for k, v in clean.items() if on_console(k))
        if self._bar is not None:
            self._bar.set_postfix_str(brief, refresh=False)
        else:
            logging.info('step %d: %s', step, brief)

    def _drop_after(self, step: int) -> None:
        """On a resume from `step`: drop the lines the interrupted run logged after it (they
        are logged again), so every step appears once; damaged lines are dropped too."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path, merge=False) if r['step'] <= step]
        self.path.write_text(''.join(json.dumps(r) + '\n' for r in kept))

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | epath.PathLike, merge: bool = True) -> list[dict]:
    """The records of a metrics.jsonl in step order; a damaged line (a kill mid-write, an
    edit) is skipped with a warning naming the file and line. `merge`: later records of the
    same step and keys win (a run resumed before this file was trimmed re-logged them)."""
    records = []
    for number, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            record['step']
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            logging.warning('%s line %d is damaged and skipped (%s)', path, number, e)
            continue
        records.append(record)
    if merge:
        by_key = {(r['step'], tuple(sorted(r))): r for r in records}
        records = list(by_key.values())
    return sorted(records, key=lambda r: r['step'])


def plot(workdir: str | epath.PathLike) -> epath.Path | None:
    """<workdir>/metrics.png: loss (and parts), alpha, and evaluation metrics over steps."""
    path = epath.Path(workdir) / 'metrics.jsonl'
    if not path.exists():
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    panels = [('loss', ('loss', 'clip', 'distill')), ('alpha', ('alpha',)),
              ('evaluation', tuple(sorted({k for r in records for k in r
                                           if k.startswith('eval/') and 'R@' in k})))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r['step'], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker='.' if title == 'evaluation' else None,
                        label=key)
        ax.set_title(title)
        ax.set_xlabel('step')
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = epath.Path(workdir) / 'metrics.png'
    with tempfile.TemporaryDirectory() as tmp:
        local = pathlib.Path(tmp) / 'metrics.png'
        fig.savefig(local, dpi=100)
        out.write_bytes(local.read_bytes())
    plt.close(fig)
    return out
