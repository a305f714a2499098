"""Evaluate a checkpoint standalone: python -m psd_jax.evaluate --config C --workdir W [--step N]

Restores the latest (or the given) checkpoint of the run in W, onto this machine's mesh, runs
the evaluators and the suite the config lists (`config.eval.evaluators`, `config.eval.suite`,
overridable like any key) and writes <workdir>/eval_step_<N>.json, plus the suite's table as
<workdir>/eval/suite_step_<N>.md and .json.

    python -m psd_jax.evaluate --config C --workdir W --suite imagenet_robustness,cifar100

runs that suite alone (psd_jax/evaluation/benchmarks.py names the suites and benchmarks);

    python -m psd_jax.evaluate --config C --init_from PATH [--workdir W] [--suite NAME]

evaluates pretrained weights instead (OpenAI CLIP / open_clip: psd_jax/pretrained.py), with no
training; the config must describe their architecture (model.preset, sizes, model.act). The
results are printed, and written to <workdir>/eval_pretrained.json (and
<workdir>/eval/suite_pretrained.md / .json) when a workdir is given.
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
flags.DEFINE_string('init_from', None, 'Pretrained weights to evaluate instead of a checkpoint '
                    '(.safetensors, .bin, .pt or an open_clip folder).')
flags.DEFINE_string('suite', None, 'Evaluate this suite alone (comma-separated suite and '
                    'benchmark names, as config.eval.suite), without the training-data '
                    'evaluators.')
flags.mark_flags_as_required(['config'])


def evaluate(config, workdir: str, step_number: int | None = None) -> dict[str, float]:
    """Restore a checkpoint of `workdir` and run the configured evaluators on it."""
    from psd_jax.data.from_config import make_tokenizer
    from psd_jax.evaluation.run import run_evaluators
    from psd_jax.persistence.saved_run import restore_variables

    variables, at, setup, mesh = restore_variables(config, workdir, step_number)
    result = {'step': at, **run_evaluators(config, setup.model, variables, mesh,
                                           make_tokenizer(config),
                                           report_dir=epath.Path(workdir) / 'eval', step=at)}
    out = epath.Path(workdir) / f'eval_step_{at}.json'
    out.write_text(json.dumps(result, indent=1))
    logging.info('wrote %s', out)
    return result


def evaluate_pretrained(config, path: str, workdir: str | None = None) -> dict[str, float]:
    """Run the configured evaluators on pretrained weights (no training, no checkpoint)."""
    import jax

    from psd_jax import config as config_lib, pretrained, sharding
    from psd_jax.persistence import layout
    from psd_jax.data.from_config import make_tokenizer
    from psd_jax.evaluation.run import run_evaluators

    config_lib.validate(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    setup = config_lib.step_setup(config, mesh)
    imported = pretrained.for_config(config, path)
    params = layout.convert(imported['params'], config.model.scan_layers)
    variables = {'params': jax.device_put(params, sharding.replicated(mesh)),
                 'batch_stats': jax.device_put(imported['batch_stats'], sharding.replicated(mesh))}
    report_dir = epath.Path(workdir) / 'eval' if workdir else None
    result = {'init_from': path, **run_evaluators(config, setup.model, variables, mesh,
                                                  make_tokenizer(config), report_dir=report_dir,
                                                  weights='pretrained')}
    if workdir:
        out = epath.Path(workdir) / 'eval_pretrained.json'
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        logging.info('wrote %s', out)
    return result


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    from psd_jax.cli import quiet_libraries
    quiet_libraries()
    from psd_jax.evaluation.run import suite_only
    config = suite_only(FLAGS.config, FLAGS.suite)
    try:
        if FLAGS.init_from:
            result = evaluate_pretrained(config, FLAGS.init_from, FLAGS.workdir)
        elif not FLAGS.workdir:
            raise ValueError('--workdir is required (or --init_from to evaluate pretrained '
                             'weights)')
        else:
            result = evaluate(config, FLAGS.workdir, FLAGS.step)
    except (ValueError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    from psd_jax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
