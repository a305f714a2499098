"""Parameter layouts: `model.scan_layers` stores each transformer's blocks once, stacked on a
leading (depth,) axis (`blocks`), instead of as `block0..block{n-1}`. A checkpoint keeps the
layout it was written with; restoring converts it into the layout the config asks for
(parameters, optimizer moments and EMA parameters alike), so the choice can change on resume.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from psd_jax.training import step


def _is_block(key: str) -> bool:
    return key.startswith('block') and key[5:].isdigit()


def stack_blocks(tree: Any) -> Any:
    """A dict tree with `block0..block{n-1}` sub-trees -> one `blocks` sub-tree whose leaves are
    stacked on a new leading (n,) axis (the `scan_layers=True` layout), at every level."""
    if not isinstance(tree, dict):
        return tree
    out = {k: stack_blocks(v) for k, v in tree.items() if not _is_block(k)}
    blocks = sorted((k for k in tree if _is_block(k)), key=lambda k: int(k[5:]))
    if blocks:
        out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[k] for k in blocks))
    return out


def unstack_blocks(tree: Any) -> Any:
    """The inverse of `stack_blocks`: `blocks` with a leading (n,) axis -> `block0..`."""
    if not isinstance(tree, dict):
        return tree
    out = {k: unstack_blocks(v) for k, v in tree.items() if k != 'blocks'}
    if 'blocks' in tree:
        n = jax.tree.leaves(tree['blocks'])[0].shape[0]
        out.update({f'block{i}': jax.tree.map(lambda x, i=i: x[i], tree['blocks'])
                    for i in range(n)})
    return out


def convert(tree: Any, scan_layers: bool) -> Any:
    """Any pytree holding parameter-like dicts (parameters, optax states, EMA) -> the layout
    `scan_layers` asks for; a tree already in it is returned unchanged."""
    if scan_layers:
        def holds(x):
            return isinstance(x, dict) and any(_is_block(k) for k in x)
        fn = stack_blocks
    else:
        def holds(x):
            return isinstance(x, dict) and 'blocks' in x
        fn = unstack_blocks
    return jax.tree.map(lambda x: fn(x) if holds(x) else x, tree, is_leaf=holds)


def scan_layers_of(setup: step.StepSetup) -> bool:
    return bool(getattr(setup.model.text_tower, 'scan_layers', False))


def with_scan_layers(setup: step.StepSetup, scan_layers: bool) -> step.StepSetup:
    """The same setup with its transformer stacks in the other layout."""
    model = setup.model
    towers = {'text_tower': model.text_tower.clone(scan_layers=scan_layers)}
    if hasattr(model.image_tower, 'scan_layers'):  # ViT; the ResNet stages have no blocks
        towers['image_tower'] = model.image_tower.clone(scan_layers=scan_layers)
    return dataclasses.replace(setup, model=model.clone(**towers))


def convert_state(state: step.TrainState, scan_layers: bool) -> step.TrainState:
    return state.replace(params=convert(state.params, scan_layers),
                         opt_state=convert(state.opt_state, scan_layers),
                         ema_params=convert(state.ema_params, scan_layers))


def restore_plan(setup: step.StepSetup, strategy: str, saved_config: dict
                 ) -> tuple[step.TrainState, Callable[[step.TrainState], step.TrainState]]:
    """(the abstract state to restore a checkpoint written with `saved_config` into, a function
    taking what is restored to this setup's layout and shardings)."""
    saved = bool(saved_config.get('model', {}).get('scan_layers', False))
    now = scan_layers_of(setup)
    if saved == now:
        return step.abstract_state(setup, step.state_shardings(setup, strategy)), lambda s: s
    other = with_scan_layers(setup, saved)
    abstract = step.abstract_state(other, step.state_shardings(other, strategy))
    to_current = jax.jit(functools.partial(convert_state, scan_layers=now),
                         out_shardings=step.state_shardings(setup, strategy))
    return abstract, to_current
