"""What keeps a run alive across crashes and restarts: checkpoints, the fallback to an
older one, the workdir's lock and config record, which keys may change on resume, parameter
layouts, and reading a saved run outside training."""
