"""A run's checkpoint and config read outside training: the standalone evaluator and the
exporter."""

from __future__ import annotations

from psd_jax import config as config_lib, sharding
from psd_jax.persistence import checkpointing, layout


def restore_variables(config, workdir: str, step_number: int | None = None):
    """(variables {'params', 'batch_stats'}, step, setup, mesh) of a checkpoint of `workdir`
    (the latest, or `step_number`), on this machine's mesh, in the config's layout."""
    config_lib.validate(config)
    ckpt = checkpointing.Checkpointer(workdir, asynchronous=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f'no checkpoint in {ckpt.directory}: nothing to read')
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
    return {'params': state.params, 'batch_stats': state.batch_stats}, at, setup, mesh


def run_config(workdir: str, given=None):
    """The run's config from <workdir>/config.json; `given` (a config from the command line)
    must agree with it on every key that defines what is exported: the model (but for how it
    is computed or where it started: psd_jax/persistence/resume_rules.py's MAY_CHANGE,
    model.init_from) and loss.kind."""
    import json

    from etils import epath

    from psd_jax import config as config_lib
    from psd_jax.persistence import resume_rules

    path = epath.Path(workdir) / 'config.json'
    if not path.exists():
        raise FileNotFoundError(f'{path} is missing: export reads the run\'s config from its '
                                'workdir (is this the workdir of a run?)')
    saved = json.loads(path.read_text())
    config = config_lib.from_saved(saved)
    if given is not None:
        ours, theirs = resume_rules.flatten(given.to_dict()), resume_rules.flatten(saved)
        for key in sorted(set(ours) | set(theirs)):
            defines = (key.startswith('model.') and key != 'model.init_from'
                       and not resume_rules.may_change(key)) or key == 'loss.kind'
            if not defines or ours.get(key) == theirs.get(key):
                continue
            raise ValueError(f'--config differs from the run\'s {path} at {key}: '
                             f'{ours.get(key)!r} given, {theirs.get(key)!r} in the run; leave '
                             '--config out to export with the run\'s own config')
    return config
