"""Mesh construction, parameter partition rules and batch sharding.

One `jax.sharding.Mesh` with named axes (e.g. data, fsdp, model). The batch is sharded over the
data axes (`DATA_AXES`: every axis that splits examples); parameters are placed by logical-axis
rules: `replicated` keeps them whole on every device, `fsdp` shards their `embed`-like dimension
over the `fsdp` axis, and `model` axes split MLP / heads / vocabulary (tensor parallelism). A rule
that does not divide a dimension falls back to replication for that dimension, so every preset
runs on every mesh.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from psd_jax.models.tracing import ACTIVATION_SHARDING

P = PartitionSpec

DATA_AXES = ('data', 'fsdp')  # mesh axes that split the batch
KNOWN_AXES = ('data', 'fsdp', 'model')

# Logical axis name -> mesh axis (or axes), per strategy.
PARTITION_RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    'replicated': (),
    'fsdp': (('embed', 'fsdp'), ('conv_out', 'fsdp'), ('vocab', 'fsdp')),
    'fsdp_tp': (('embed', 'fsdp'), ('conv_out', 'fsdp'), ('mlp', 'model'), ('heads', 'model'),
                ('vocab', 'model')),
}


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the named axes and sizes in `axes` (one size may be -1: the rest).

    `axes` is ordered (data first); a size-1 axis is fine, so one device runs the same code as a
    pod. `devices` defaults to all devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axes)
    unknown = [n for n in names if n not in KNOWN_AXES]
    if unknown:
        raise ValueError(f'mesh axes {unknown} are not known; allowed: {list(KNOWN_AXES)}')
    sizes = [int(axes[n]) for n in names]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f'mesh axes {dict(axes)}: at most one size may be -1')
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f'mesh axes {dict(axes)}: sizes must be positive or -1')
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(f'mesh axes {dict(axes)}: {len(devices)} devices do not divide by '
                             f'the fixed axes (product {fixed})')
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise ValueError(f'mesh axes {dict(zip(names, sizes))} need {math.prod(sizes)} devices, '
                         f'there are {len(devices)}')
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    try:
        return jax.make_mesh(tuple(sizes), names, axis_types=axis_types, devices=devices)
    except AssertionError:  # e.g. TPU v4 topology descriptions with one device per core:
        return Mesh(np.asarray(devices).reshape(sizes), names,  # place them in order
                    axis_types=axis_types)


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over, in mesh order."""
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def data_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in data_axes(mesh))


def batch_partition(mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for arrays whose leading dimension is the batch."""
    axes = data_axes(mesh)
    return P(axes if axes else None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh) -> Iterator[None]:
    """Inside (while tracing): the transformer blocks' activations stay split over the mesh's
    data axes (models.tracing.constrain_batch). Scanned stacks need it: inside their loop XLA
    may otherwise replicate the batch (measured: 7x the temporaries on 8 CPU devices)."""
    token = ACTIVATION_SHARDING.set(batch_sharding(mesh))
    try:
        yield
    finally:
        ACTIVATION_SHARDING.reset(token)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_partition(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, name: str = 'batch') -> None:
    """Raise a ValueError naming `name` when `batch_size` does not split over the data axes."""
    n = data_size(mesh)
    if batch_size % n:
        raise ValueError(f'{name} size {batch_size} does not divide across the data axes '
                         f'{data_axes(mesh)} of the mesh ({n} shards); use a multiple of {n}')


def _spec_for(shape: tuple[int, ...], logical: tuple[str | None, ...] | None,
              rules: Mapping[str, Any], mesh: Mesh) -> PartitionSpec:
    if not logical:
        return P()
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, logical):
        axis = rules.get(name) if name else None
        if axis is None or axis not in mesh.shape or axis in used or dim % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return P(*out)


def param_shardings(abstract_vars: Any, mesh: Mesh, strategy: str = 'replicated') -> Any:
    """NamedShardings for a (boxed) variable tree from `jax.eval_shape(model.init, ...)`.

    Returns a tree of the same structure as the *unboxed* variables.
    """
    if strategy not in PARTITION_RULES:
        raise ValueError(f'parameter sharding strategy {strategy!r} is not known; allowed: '
                         f'{sorted(PARTITION_RULES)}')
    rules = dict(PARTITION_RULES[strategy])

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            spec = _spec_for(leaf.value.shape, leaf.names, rules, mesh)
        else:
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_vars, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def describe(mesh: Mesh) -> str:
    """One line for logs: axis sizes and device kind."""
    kind = np.asarray(mesh.devices).flat[0].device_kind
    return f'mesh {dict(mesh.shape)} on {mesh.size} x {kind}'
