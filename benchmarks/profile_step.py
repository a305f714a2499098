"""Where a train step's time goes: the compiled step of a benchmarks/vs_open_clip.py case traced
with jax.profiler, each XLA operation's time summed by what it computes.

    python benchmarks/profile_step.py [--case small] [--steps 3]
        [--out benchmarks/results/profile_small.json]

Rows: the part of the model or step an operation belongs to (from the HLO metadata's op name:
attention, MLP, layer norms, token embedding, loss, optimizer update...) crossed with its kind
(matmul, or the rest: elementwise, transposes, copies, reductions). Operations run concurrently
on the CPU's threads, so the column sums exceed the wall time per step, printed with them.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = [('optimizer update', ('cond/branch',)), ('token embedding', ('token_embedding',)),
         ('attention', ('/attn/',)), ('MLP', ('/mlp/',)), ('layer norms', ('/ln', 'ln_')),
         ('patch embedding', ('patch_embed', 'conv')), ('loss', ('loss', 'shard_map')),
         ('projections and pooling', ('proj', 'pool', 'encode'))]


def part_of(op_name: str) -> str:
    for part, keys in PARTS:
        if any(k in op_name for k in keys):
            return part
    return 'other (gradient norm, metrics, ...)'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--case', default='small')
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    import jax

    import vs_open_clip

    run = vs_open_clip.psd_jax_step(vs_open_clip.CASES[args.case])
    fn, state, batch = run['fn'], run['state'], run['put'](run['batch'])
    for _ in range(2):
        state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    names = {}  # HLO instruction -> its op_name metadata
    for line in fn.as_text().splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
        if m:
            names[m.group(1)] = m.group(2)
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, metrics = fn(state, batch)
            jax.block_until_ready(metrics)
        wall = (time.perf_counter() - start) / args.steps
        trace = next(pathlib.Path(trace_dir).rglob('*perfetto_trace.json.gz'))
        events = json.load(gzip.open(trace))
    events = events['traceEvents'] if isinstance(events, dict) else events
    table = collections.defaultdict(lambda: collections.Counter())
    for e in events:
        name = e.get('name', '')
        if e.get('ph') != 'X' or name not in names:
            continue
        kind = 'matmul' if name.startswith(('ynn_fusion', 'dot', 'xnn_fusion')) else 'other'
        table[part_of(names[name])][kind] += e.get('dur', 0) / 1e3 / args.steps
    rows = sorted(table.items(), key=lambda kv: -sum(kv[1].values()))
    total = sum(sum(c.values()) for _, c in rows)
    print(f'case {args.case}: {1e3 * wall:.0f} ms per step (wall); operation time by part '
          f'(ms per step; concurrent operations overlap)')
    print(f'{"part":>36} {"matmul":>8} {"other":>8} {"share":>6}')
    out = []
    for part, c in rows:
        print(f'{part:>36} {c["matmul"]:>8.1f} {c["other"]:>8.1f} '
              f'{sum(c.values()) / total:>6.1%}')
        out.append({'part': part, 'matmul_ms': c['matmul'], 'other_ms': c['other']})
    print(f'{"total":>36} {sum(c["matmul"] for _, c in rows):>8.1f} '
          f'{sum(c["other"] for _, c in rows):>8.1f}')
    if args.out:
        from psd_jax import provenance
        pathlib.Path(args.out).write_text(json.dumps(
            {**provenance.record('python benchmarks/profile_step.py'), 'case': args.case,
             'wall_ms_per_step': 1e3 * wall, 'parts': out}, indent=1))
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
