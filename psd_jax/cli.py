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
        if '/psd_jax/' in record.pathname:
            return True
        if record.levelno < py_logging.WARNING:
            return False
        return not str(record.msg).startswith(CHATTER)


# library warnings that say nothing a user can act on
CHATTER = ('Using custom data configuration',)


def quiet_libraries() -> None:
    """Install OnlyOurInfo on the absl handler and silence the library tracebacks that follow
    a failed checkpoint read (quiet_failed_reads), unless --library_logs (call after
    parsing)."""
    if flags.FLAGS.library_logs:
        return
    from absl import logging as absl_logging
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, OnlyOurInfo) for f in handler.filters):
        handler.addFilter(OnlyOurInfo())
    quiet_failed_reads()


class NoOrphanedFutures(py_logging.Filter):
    """asyncio's 'exception was never retrieved' reports of the reads a failed restore left
    running: the restore's own error says what failed."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return 'exception was never retrieved' not in record.getMessage()


def is_read_aftermath(error: BaseException | None, where: object = None) -> bool:
    """Whether an exception that reached a hook comes from the other reads of a checkpoint
    restore that failed: a coroutine of Orbax or TensorStore that raised after its event loop
    closed, or a callback of theirs finding the loop closed."""
    if isinstance(error, RuntimeError) and 'Event loop is closed' in str(error):
        return True
    text = repr(where) + ''.join(
        f'{frame.f_code.co_filename}' for frame in _frames(getattr(error, '__traceback__', None)))
    return 'orbax' in text or 'tensorstore' in text


def _frames(tb):
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def quiet_failed_reads() -> None:
    """When Orbax's restore of a damaged checkpoint fails, its other reads still finish on
    TensorStore's threads and raise into a closed event loop: hundreds of tracebacks (as
    unraisable coroutines, thread callbacks and asyncio log records) that say nothing the
    restore's error does not. They are dropped; every other exception is reported as before."""
    unraisable, excepthook = sys.unraisablehook, sys.excepthook
    if getattr(unraisable, 'psd_jax', False):
        return

    def on_unraisable(info):
        if type(info.exc_value).__name__ == 'Interrupted':  # SIGTERM, which is sent
            return  # again (checkpointing.PreemptionFlag._again)
        if not is_read_aftermath(info.exc_value, info.object):
            unraisable(info)

    def on_exception(kind, value, tb):
        if not (isinstance(value, RuntimeError) and 'Event loop is closed' in str(value)):
            excepthook(kind, value, tb)

    on_unraisable.psd_jax = True
    sys.unraisablehook, sys.excepthook = on_unraisable, on_exception
    py_logging.getLogger('asyncio').addFilter(NoOrphanedFutures())


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

