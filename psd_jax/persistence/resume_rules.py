"""Resume safety: which config keys may change when a run resumes from its workdir.

A checkpoint records the config it was written with. Before anything is written, the new
config is compared with it key by key (dotted names, e.g. 'loss.psd.teacher'):
- keys that only say how the run is watched or placed (logging, evaluation, checkpoint cadence,
  the mesh and parameter placement, more steps) may change; each change is logged;
- every other key defines the run (model, loss and teacher, optimiser, data source, path and
  order, global batch, seed, ...) and may not change, unless it is named in
  `train.resume_allow_changes` (a deliberate change, e.g. ('optim.lr',) to continue at another
  learning rate); the error names each key with old -> new and what to do.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

# Keys (or key prefixes ending in '.') that may differ between a checkpoint and its resume.
MAY_CHANGE = (
    'train.steps', 'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
    'train.keep_every', 'train.eval_every', 'train.transfer_guard', 'train.nonfinite',
    'train.nonfinite_limit', 'train.max_update_ratio', 'train.resume_allow_changes',
    'train.profile_steps', 'eval.',
    'metrics.', 'mesh.',
    'param_sharding', 'loss.impl', 'loss.tile', 'loss.precision',  # the same loss, computed
    # another way
    'train.micro_batches', 'model.remat', 'model.attention',  # the same values, computed
    # with other memory or kernels
    'data.read_threads', 'data.read_ahead',  # how records are read, not which
    # the checkpoint's layout is converted on restore (psd_jax/persistence/layout.py)
    'model.scan_layers',
)

# Keys added to the config since runs were made: a checkpoint whose config lacks one ran with the
# behaviour the value here gives, so meeting that value on resume is no change.
ADDED_KEYS = {'model.act': '', 'model.init_from': '', 'loss.psd.soft_weight': 'constant'}


def flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, with values as JSON gives them back (tuples as lists),
    so a config read from a checkpoint and one built in memory compare equal."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f'{prefix}{key}'
        if isinstance(value, Mapping):
            out.update(flatten(value, name + '.'))
        else:
            out[name] = json.loads(json.dumps(value, default=str))
    return out


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith('.') and key.startswith(k)) for k in MAY_CHANGE)


def check_resume(saved: Mapping[str, Any], new: Mapping[str, Any], checkpoint_step: int,
                 where: str) -> dict[str, tuple[Any, Any]]:
    """Compare the checkpoint's config `saved` with the `new` one (nested dicts). Returns the
    changed keys as {key: (old, new)} when every change is allowed; raises ValueError naming
    each forbidden change otherwise. `where`: the checkpoint directory, for the message."""
    old, cur = flatten(saved), flatten(new)
    for key, value in ADDED_KEYS.items():
        if key not in old and cur.get(key) == value:
            old[key] = value
    changed = {k: (old.get(k, '<absent>'), cur.get(k, '<absent>'))
               for k in sorted(set(old) | set(cur)) if old.get(k, '<absent>') != cur.get(
                   k, '<absent>')}
    allowed = set(cur.get('train.resume_allow_changes') or ())
    forbidden = {k: v for k, v in changed.items() if not may_change(k) and k not in allowed}
    if forbidden:
        lines = '; '.join(f'config.{k}: {a!r} -> {b!r}' for k, (a, b) in forbidden.items())
        raise ValueError(
            f'{where} holds a checkpoint (step {checkpoint_step}) of a run with another '
            f'config: {lines}. These keys define the run, so resuming would silently train '
            'something else. Use a new --workdir, or put the original values back, or, to '
            'change them deliberately, list them in '
            f"--config.train.resume_allow_changes=\"{tuple(forbidden)!r}\"")
    steps = cur.get('train.steps')
    if isinstance(steps, int) and steps < checkpoint_step:
        raise ValueError(
            f'config.train.steps={steps} is below the step of the latest checkpoint in {where} '
            f'({checkpoint_step}): the run has already gone past it. Use '
            f'--config.train.steps>={checkpoint_step}, or a new --workdir')
    return changed


def describe_data_change(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """'records 96 -> 120, source fingerprint 1a2b.. -> 3c4d..': the fields of two data
    identities (datasets.identity) that differ."""
    parts = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if old == new:
            continue
        if key == 'source' and isinstance(old, dict) and isinstance(new, dict):
            for field in ('path', 'files', 'fingerprint'):
                if old.get(field) != new.get(field):
                    a, b = old.get(field), new.get(field)
                    short = field == 'fingerprint'
                    parts.append(f'source {field} {str(a)[:12] if short else a}'
                                 f'{"..." if short else ""} -> '
                                 f'{str(b)[:12] if short else b}{"..." if short else ""}')
        else:
            parts.append(f'{key} {old} -> {new}')
    return ', '.join(parts)


def check_data(saved: Mapping[str, Any] | None, now: Mapping[str, Any], checkpoint_step: int,
               config: Mapping[str, Any]) -> str | None:
    """Compare the training data's identity saved with a checkpoint with today's. None: the
    same data (or a checkpoint that did not record it). A difference raises ValueError naming
    it, unless 'data' is in train.resume_allow_changes: then the difference is returned (the
    caller restarts the data position and records it)."""
    if saved is None or dict(saved) == dict(now):
        return None
    change = describe_data_change(saved, now)
    cur = flatten(config)
    if 'data' in set(cur.get('train.resume_allow_changes') or ()):
        return change
    where = cur.get('data.path') or now.get('dataset', '')
    raise ValueError(
        f'the prepared data changed since step {checkpoint_step} (config.data.path / '
        f'config.data.dataset: {where}): {change}. Resuming would train on other data than '
        'the run started with. Put the original data back, use a new --workdir, or, to go on '
        "with the new data deliberately, add --config.train.resume_allow_changes=\"('data',)\" "
        '(its data order then starts again at the checkpoint\'s step)')
