"""Command-line plumbing shared by psd_jax.main and psd_jax.evaluate."""

from __future__ import annotations

import logging as py_logging
import re
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
        print(f'error: {_override_error(e, overrides)}', file=sys.stderr)
        sys.exit(2)


def _override_error(error: Exception, overrides: list[str]) -> str:
    """One line for a failed `--config.key=value`: an unknown key is named as such with the
    override it came from (and ml_collections' near match, when it has one)."""
    text = _one_line(error)
    name = re.match(r"'?([A-Za-z_][\w]*)'?", text)
    if isinstance(error, (AttributeError, KeyError)) and name:
        key = name.group(1)
        culprit = next((o for o in overrides
                        if key in o.split('=', 1)[0].split('.')[1:]), None)
        if culprit is not None:
            hint = text[text.index('Did you mean'):] if 'Did you mean' in text else (
                'no key of a similar name exists; configs/*.py and psd_jax/config.py list '
                'the keys')
            return f'unknown config key {key!r} in {culprit.split("=", 1)[0]}: {hint}'
    return f'{text} (config overrides: {" ".join(overrides)})'

