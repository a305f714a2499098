"""The demo suite on the demo's final checkpoint: the README's two commands, then the suite.

    python benchmarks/demo_suite.py [--workdir /tmp/psd_demo] [--out docs/results/demo_suite.json]

Trains configs/demo.py in --workdir (nothing is trained again when the run there has finished),
runs `python -m psd_jax.evaluate --config configs/demo.py --workdir W --suite demo`, and stores
the suite's result (every benchmark's metrics, the average) with the commit, the commands and
the machine; README.md's suite table is written from it (python -m benchmarks.render).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from psd_jax import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(command: list[str]) -> float:
    """Runs one of the README's commands; its wall time in seconds."""
    print('$', ' '.join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT)
    if done.returncode:
        raise SystemExit(f'{" ".join(command)} failed (exit {done.returncode})')
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdir', default='/tmp/psd_demo')
    parser.add_argument('--out', default=str(ROOT / 'docs' / 'results' / 'demo_suite.json'))
    args = parser.parse_args()
    commands = [['python', '-m', 'psd_jax.main', '--config', 'configs/demo.py', '--workdir',
                 args.workdir],
                ['python', '-m', 'psd_jax.evaluate', '--config', 'configs/demo.py', '--workdir',
                 args.workdir, '--suite', 'demo']]
    seconds = [run(c) for c in commands]
    found = sorted(pathlib.Path(args.workdir, 'eval').glob('suite_step_*.json'),
                   key=lambda p: int(p.stem.rsplit('_', 1)[1]))
    if not found:
        raise SystemExit(f'{args.workdir}/eval: no suite_step_*.json written by the evaluation')
    suite = json.loads(found[-1].read_text())
    result = {**provenance.record('python benchmarks/demo_suite.py'),
              'what': "the demo suite on the demo run's final checkpoint (configs/demo.py, "
                      'seed 0)',
              'commands': [' '.join(c) for c in commands], 'seconds': seconds, **suite}
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    print(f'average {100 * suite["average"]:.2f}% over {len(suite["benchmarks"])} benchmarks; '
          f'wrote {out}')


if __name__ == '__main__':
    main()
