"""Per-device temporary memory of the sharded PSD loss (value and gradient) vs a replicated one.

For each global batch B the loss (PSD, same-pass and second-pass teachers, embedding dim 512) is
compiled, not run, on 8 devices with the all_gather scheme, and on one device, where the whole
B x B similarity matrix lives in one place (what a replicated loss needs on every device).
Reports XLA's `memory_analysis().temp_size_in_bytes`. On a CPU host the 8 devices are emulated.

    python benchmarks/loss_memory.py [--batches 1024 4096 16384]
                                     [--out benchmarks/results/loss_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[1024, 4096, 16384])
    parser.add_argument('--dim', type=int, default=512)
    parser.add_argument('--devices', type=int, default=8)
    parser.add_argument('--out', default=str(pathlib.Path(__file__).parent / 'results' /
                                             'loss_memory.json'))
    args = parser.parse_args()
    if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                   f' --xla_force_host_platform_device_count={args.devices}')
    import jax
    import jax.numpy as jnp

    from psd_jax import losses, sharding

    def temp_bytes(mesh, batch: int, teacher: bool) -> int:
        emb = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32,
                                   sharding=sharding.batch_sharding(mesh))
        rep = sharding.replicated(mesh)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        mask = jax.ShapeDtypeStruct((batch,), bool, sharding=rep)

        def f(u, v, s, subset, tu, tv):
            t = losses.Teacher(tu, tv, s, subset) if teacher else None
            return losses.psd_loss(u, v, s, mesh=mesh, subset=subset, alpha=0.5, teacher=t,
                                   teacher_temperature=2.0)[0]

        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(
            emb, emb, scalar, mask, emb, emb).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f'need {args.devices} devices, found {len(jax.devices())}')
    sharded_mesh = sharding.make_mesh({'data': args.devices}, devices)
    single_mesh = sharding.make_mesh({'data': 1}, devices[:1])
    rows = []
    mib = 2 ** 20
    header = (f'{"B":>6} {"teacher":>12} {"sharded MiB/dev":>16} {"replicated MiB/dev":>19} '
              f'{"ratio":>6} {"one BxB f32 MiB":>16}')
    print(f'PSD loss value+grad, D={args.dim}, {args.devices} x {devices[0].device_kind}')
    print(header)
    print('-' * len(header))
    for batch in args.batches:
        for teacher in (False, True):
            sharded = temp_bytes(sharded_mesh, batch, teacher)
            single = temp_bytes(single_mesh, batch, teacher)
            row = {'batch': batch, 'teacher': 'second_pass' if teacher else 'same_pass',
                   'devices': args.devices, 'dim': args.dim,
                   'sharded_temp_bytes_per_device': sharded,
                   'replicated_temp_bytes_per_device': single,
                   'bxb_float32_bytes': batch * batch * 4}
            rows.append(row)
            print(f'{batch:>6} {row["teacher"]:>12} {sharded / mib:>16.1f} {single / mib:>19.1f} '
                  f'{single / sharded:>6.2f} {batch * batch * 4 / mib:>16.1f}')
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'device_kind': devices[0].device_kind, 'rows': rows}, indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
