"""Per-device temporary memory of the sharded contrastive loss (value and gradient): all_gather
vs ring vs a replicated loss.

For each global batch B, embedding dim D and loss (CLIP; PSD with the same-pass teacher; PSD
with teacher embeddings of its own, as the second-pass and EMA teachers give) the loss is
compiled, not run, on N devices with the all_gather scheme (b x B slabs) and with the ring
(b x tile tiles), and on one device, where the whole B x B similarity matrix lives in one place
(what a replicated loss needs on every device; skipped above --replicated-max). Reports XLA's
`memory_analysis().temp_size_in_bytes` per device. On a CPU host the N devices are emulated.

    python benchmarks/loss_memory.py [--batches 16384 65536 131072 262144] [--dims 512 768]
        [--losses clip psd_same_pass psd_second_pass] [--impls all_gather ring]
        [--devices 8] [--tile 256] [--out benchmarks/results/loss_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batches', type=int, nargs='+',
                        default=[16384, 65536, 131072, 262144])
    parser.add_argument('--losses', nargs='+', default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument('--impls', nargs='+', default=['all_gather', 'ring'],
                        choices=['all_gather', 'ring'])
    parser.add_argument('--dims', type=int, nargs='+', default=[512, 768])
    parser.add_argument('--devices', type=int, default=8)
    parser.add_argument('--tile', type=int, default=256, help="the ring's tile width")
    parser.add_argument('--replicated-max', type=int, default=16384,
                        help='largest B for which the one-device (replicated) loss is compiled')
    parser.add_argument('--out', default=str(pathlib.Path(__file__).parent / 'results' /
                                             'loss_memory.json'))
    args = parser.parse_args()
    if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                   f' --xla_force_host_platform_device_count={args.devices}')
    import jax

    from psd_jax import sharding

    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f'need {args.devices} devices, found {len(jax.devices())}')
    meshes = {'sharded': sharding.make_mesh({'data': args.devices}, devices),
              'single': sharding.make_mesh({'data': 1}, devices[:1])}
    gib = 2 ** 30
    header = (f'{"B":>7} {"D":>4} {"loss":>15} {"all_gather GiB":>15} {"ring GiB":>9} '
              f'{"replicated GiB":>15} {"gather/ring":>11}')
    print(f'loss value+grad per device, {args.devices} x {devices[0].device_kind}, ring '
          f'tile {args.tile}')
    print(header)
    print('-' * len(header))
    rows = []
    for batch in args.batches:
        for dim in args.dims:
            for loss in args.losses:
                row = measure(meshes, batch, dim, loss, args)
                rows.append(row)
                rep, gathered, ring = (
                    row[f'{k}_temp_bytes_per_device'] for k in ('replicated', 'all_gather',
                                                                'ring'))
                cells = [f'{x / gib:.3f}' if x is not None else '-' for x in (gathered, ring,
                                                                              rep)]
                ratio = f'{gathered / ring:.1f}' if gathered and ring else '-'
                print(f'{batch:>7} {dim:>4} {loss:>15} {cells[0]:>15} {cells[1]:>9} '
                      f'{cells[2]:>15} {ratio:>11}', flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from psd_jax import provenance
    out.write_text(json.dumps({**provenance.record('python benchmarks/loss_memory.py'),
                               'device_kind': devices[0].device_kind, 'tile': args.tile,
                               'rows': rows}, indent=1))
    print(f'wrote {out}')


LOSSES = ('clip', 'psd_same_pass', 'psd_second_pass')


def compile_loss(mesh, batch: int, dim: int, loss: str, impl: str = 'all_gather',
                 tile: int = 0):
    """jit(value_and_grad(loss)) compiled (not run) for (batch, dim) embeddings sharded on
    `mesh`; `loss`: one of LOSSES (psd_second_pass: teacher embeddings of its own, as the
    second-pass and EMA teachers give), with LossConfig's defaults (what the configs train
    with) but impl and tile. tests/test_loss_properties.py inspects these too."""
    import jax
    import jax.numpy as jnp

    from psd_jax import losses, sharding

    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding.batch_sharding(mesh))
    rep = sharding.replicated(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    mask = jax.ShapeDtypeStruct((batch,), bool, sharding=rep)

    config = losses.LossConfig(kind='clip' if loss == 'clip' else 'psd', impl=impl, tile=tile)

    def f(u, v, s, subset, tu, tv):
        if loss == 'clip':
            return losses.clip_loss(u, v, s, mesh=mesh, config=config)[0]
        t = losses.Teacher(tu, tv, s, subset) if loss == 'psd_second_pass' else None
        return losses.psd_loss(u, v, s, mesh=mesh, config=config, subset=subset, alpha=0.5,
                               teacher=t)[0]

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(
        emb, emb, scalar, mask, emb, emb).compile()


def temp_bytes(mesh, batch: int, dim: int, loss: str, impl: str, tile: int) -> int:
    """Compiled temporaries of the loss's value and gradient on `mesh`, per device."""
    return compile_loss(mesh, batch, dim, loss, impl, tile).memory_analysis(
    ).temp_size_in_bytes


def measure(meshes: dict, batch: int, dim: int, loss: str, args) -> dict:
    sharded = meshes['sharded']
    per_device = batch // args.devices
    tiles = {'all_gather': 0, 'ring': min(args.tile, per_device)}
    row = {'batch': batch, 'dim': dim, 'devices': args.devices, 'loss': loss,
           'bxb_float32_bytes': batch * batch * 4}
    for impl, tile in tiles.items():
        row[f'{impl}_temp_bytes_per_device'] = (
            temp_bytes(sharded, batch, dim, loss, impl, tile) if impl in args.impls else None)
    row['replicated_temp_bytes_per_device'] = (
        temp_bytes(meshes['single'], batch, dim, loss, 'all_gather', 0)
        if batch <= args.replicated_max else None)
    return row


if __name__ == '__main__':
    main()
