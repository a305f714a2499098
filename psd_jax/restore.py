"""A run's checkpoint read outside training: the standalone evaluator and the exporter."""

from __future__ import annotations

from psd_jax import checkpointing, config as config_lib, layout, sharding


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
