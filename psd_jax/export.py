"""Export a checkpoint to open_clip: python -m psd_jax.export --workdir W --out DIR

Reads the run's own config (W/config.json, written at its start: the model, with every
`--config.model.*` flag the run was given), restores the latest (or `--step`) checkpoint of the
run in W and writes DIR as an open_clip
folder: `open_clip_model.safetensors` (PyTorch layouts) and `open_clip_config.json` (the model
config and CLIP's preprocessing), which open_clip loads with
`open_clip.create_model_and_transforms('local-dir:DIR')` and psd_jax with
`--config.model.init_from=DIR`. Tools such as CLIP_benchmark take it from there. A `--config`
given as well is checked against the run's: the first model key that differs is named,
in one line, and nothing is written. The files are readable as the rest of DIR is.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Optional: the experiment config, checked '
                                "against the run's own config.json.", lock_config=True)
flags.DEFINE_string('workdir', None, 'The run directory holding checkpoints/.')
flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
flags.DEFINE_string('out', None, 'The open_clip folder to write.')
flags.mark_flags_as_required(['workdir', 'out'])


def export(config, workdir: str, out: str, step_number: int | None = None) -> str:
    """Write checkpoint `step_number` (default: the latest) of `workdir` as an open_clip folder;
    returns its path."""
    import jax

    from psd_jax import config as config_lib, pretrained
    from psd_jax.persistence import layout
    from psd_jax.persistence.saved_run import restore_variables

    if config.loss.kind == 'sigmoid':
        raise ValueError("loss.kind='sigmoid': its logit bias has no place in open_clip's CLIP "
                         'model; export supports CLIP and PSD runs')
    variables, at, _, _ = restore_variables(config, workdir, step_number)
    variables = jax.device_get({'params': layout.convert(variables['params'], False),
                                'batch_stats': variables['batch_stats']})
    folder = pretrained.write_open_clip(out, variables, config_lib.model_spec(config))
    logging.info('exported step %d of %s to %s', at, workdir, folder)
    return str(folder)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    from psd_jax.cli import quiet_libraries
    quiet_libraries()
    try:
        from psd_jax.persistence.saved_run import run_config
        config = run_config(FLAGS.workdir, FLAGS.config)
        print(export(config, FLAGS.workdir, FLAGS.out, FLAGS.step))
    except (ValueError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    from psd_jax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
