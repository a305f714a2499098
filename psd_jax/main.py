"""Entry point: python -m psd_jax.main --config configs/demo.py --workdir /tmp/demo

`--config.key=value` overrides any key; the config is locked, so a mistyped key fails naming
the nearest valid one. Multi-host runs initialise `jax.distributed` here: on Cloud TPU pods and
under SLURM or Open MPI (more than one task) automatically, elsewhere from
--coordinator_address/--num_processes/--process_id (or the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).

Exit codes: 0 the run finished (trained and evaluated); 2 a config, input or workdir error
(one line on stderr naming the key or file); 3 the run diverged (non-finite steps beyond
train.nonfinite's policy; the last good checkpoint is kept); 143 preempted (SIGTERM: the run
checkpointed and stopped; run the same command again to resume, which is what a scheduler
should do on this code).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from psd_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the config.')
flags.DEFINE_string('coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
                    'host:port of process 0 for multi-host runs.')
flags.DEFINE_integer('num_processes', int(os.environ.get('JAX_NUM_PROCESSES', 0) or 0) or None,
                     'Number of processes in a multi-host run.')
flags.DEFINE_integer('process_id', int(os.environ.get('JAX_PROCESS_ID', -1)) if
                     os.environ.get('JAX_PROCESS_ID') else None, 'This process (0-based).')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
    """jax.distributed.initialize when the environment asks for it."""
    import jax

    if FLAGS.coordinator_address:
        if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
            jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU multi-host
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    elif (os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('CLOUD_TPU_TASK_ID')
          or int(os.environ.get('SLURM_NTASKS', '1')) > 1
          or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1):
        # Cloud TPU pod, SLURM or Open MPI: JAX reads the coordinator, process count and id
        # from the environment
        jax.distributed.initialize()


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    cli.quiet_libraries()
    initialize_distributed()
    from psd_jax.training import train  # after distributed initialisation

    from psd_jax.persistence.fallback import CheckpointUnavailable
    from psd_jax.training.guard import TrainingDiverged

    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.Preempted as e:  # checkpointed: a scheduler should requeue the job
        logging.warning('%s', e)
        sys.exit(train.PREEMPTED_EXIT_CODE)
    except TrainingDiverged as e:
        fail(e, DIVERGED_EXIT_CODE)
    except CheckpointUnavailable as e:  # storage did not answer: try again later
        fail(e, UNAVAILABLE_EXIT_CODE)
    except (ValueError, FileNotFoundError) as e:  # config and input errors: no traceback
        fail(e, 2)


DIVERGED_EXIT_CODE = 3
UNAVAILABLE_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint could not be read; nothing was changed


def fail(error: Exception, code: int) -> None:
    """One line on stderr instead of a traceback (and in the log file, when absl writes one:
    on stderr the log line would say it twice), and exit `code`."""
    from absl import logging as absl_logging
    if absl_logging.get_absl_handler().python_handler.stream is not sys.stderr:
        logging.error('%s', error)
    print(f'error: {error}', file=sys.stderr)
    sys.exit(code)


def run() -> None:
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
    run()
