"""Command-line plumbing shared by psd_jax.main and psd_jax.evaluate."""

from __future__ import annotations

import sys

from absl import flags


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
