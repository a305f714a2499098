"""Command-line plumbing shared by psd_jax.main and psd_jax.evaluate."""

from __future__ import annotations

import logging as py_logging
import sys

from absl import flags

flags.DEFINE_boolean('library_logs', False, 'Show the INFO logs of the libraries underneath '
                     '(Orbax, grain, JAX); by default the console shows psd_jax\'s progress, '
                     'metrics, checkpoints, warnings and errors only.')


class OnlyOurInfo(py_logging.Filter):
    """Let INFO and below through only from psd_jax's own modules; warnings and errors from
    anywhere."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or '/psd_jax/' in record.pathname


def quiet_libraries() -> None:
    """Install OnlyOurInfo on the absl handler unless --library_logs (call after parsing)."""
    if flags.FLAGS.library_logs:
        return
    from absl import logging as absl_logging
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, OnlyOurInfo) for f in handler.filters):
        handler.addFilter(OnlyOurInfo())


def _one_line(error: Exception) -> str:
    text = str(error).strip('\'"').replace("\\'", "'").replace('\\n', ' ').replace('\n', ' ')
    return ' '.join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config errors (unknown key, wrong type, bad file) as one line:
    ml_collections raises AttributeError / TypeError / KeyError / ValueError while applying
    `--config.key=value` overrides to the locked config."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f'error: {_one_line(e)}', file=sys.stderr)
        sys.exit(2)
    except (AttributeError, TypeError, KeyError, ValueError) as e:
        overrides = [a for a in argv[1:] if a.startswith('--config.')]
        print(f'error: {_one_line(e)} (config overrides: {" ".join(overrides)})',
              file=sys.stderr)
        sys.exit(2)
