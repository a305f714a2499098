"""Evaluate a checkpoint standalone: python -m psd_jax.evaluate --config C --workdir W [--step N]

Restores the latest (or the given) checkpoint of the run in W, onto this machine's mesh, runs
the evaluators the config lists (`config.eval.evaluators`, overridable like any key) and writes
<workdir>/eval_step_<N>.json.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'The run directory holding checkpoints/.')
flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
flags.mark_flags_as_required(['config', 'workdir'])


def evaluate(config, workdir: str, step_number: int | None = None) -> dict[str, float]:
    """Restore a checkpoint of `workdir` and run the configured evaluators on it."""
    from psd_jax import checkpointing, config as config_lib, layout, sharding
    from psd_jax.data.from_config import make_tokenizer
    from psd_jax.evaluation.run import run_evaluators

    config_lib.validate(config)
    ckpt = checkpointing.Checkpointer(workdir, asynchronous=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f'no checkpoint in {ckpt.directory}: nothing to evaluate')
    mesh = sharding.make_mesh(config.mesh.to_dict())
    size = 0
    if config_lib.loss_config(config).needs_bank:  # the bank's shape is part of the state
        from psd_jax.data.from_config import open_split
        size = len(open_split(config, config.data.train_split))
    setup = config_lib.step_setup(config, mesh, dataset_size=size)
    abstract, to_current = layout.restore_plan(setup, config.param_sharding,
                                               ckpt.restore_config(step_number))
    state, at = ckpt.restore(abstract, None, step_number)
    state = to_current(state)
    ckpt.close()
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    result = {'step': at, **run_evaluators(config, setup.model, variables, mesh,
                                           make_tokenizer(config))}
    out = epath.Path(workdir) / f'eval_step_{at}.json'
    out.write_text(json.dumps(result, indent=1))
    logging.info('wrote %s', out)
    return result


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    from psd_jax.cli import quiet_libraries
    quiet_libraries()
    try:
        result = evaluate(FLAGS.config, FLAGS.workdir, FLAGS.step)
    except (ValueError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    from psd_jax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
