"""Writes the generated blocks of README.md and docs/ from the stored results JSON, so that every
table of figures is what a stored run of a recorded commit measured, and nothing else.

    python -m benchmarks.render            # rewrite every block in place
    python -m benchmarks.render --check    # change nothing; exit 1 naming each block that differs

A block in a Markdown file is delimited by two comments; everything between them is generated
by the function of that name in benchmarks/tables.py:

    <!-- render: demo -->
    ...
    <!-- end render -->
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

try:
    from benchmarks import tables
except ImportError:  # run as a script: python benchmarks/render.py
    import tables

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r'(<!-- render: (\S+) -->\n)(.*?)(<!-- end render -->)', re.S)


def documents(root: pathlib.Path) -> list[pathlib.Path]:
    """README.md and every Markdown file under docs/."""
    return [root / 'README.md', *sorted((root / 'docs').rglob('*.md'))]


def render_text(text: str, root: pathlib.Path, where: str) -> tuple[str, list[str]]:
    """(`text` with each block regenerated, the names of the blocks it holds). An unknown block
    name is refused naming the file and the names that exist."""
    names = []

    def one(match: re.Match) -> str:
        name = match[2]
        if name not in tables.TABLES:
            raise SystemExit(f'{where}: unknown generated block {name!r}; known: '
                             f'{sorted(tables.TABLES)} (benchmarks/tables.py)')
        names.append(name)
        return f'{match[1]}{tables.TABLES[name](root)}\n{match[4]}'

    return BLOCK.sub(one, text), names


def render(root: pathlib.Path = ROOT, check: bool = False) -> list[str]:
    """Regenerates every block (or, with `check`, only compares); returns 'file: block' for
    each block whose text differs from what the stored JSON gives."""
    differing = []
    for path in documents(root):
        text = path.read_text()
        new, names = render_text(text, root, str(path.relative_to(root)))
        if new == text:
            continue
        old_blocks = {m[2]: m[3] for m in BLOCK.finditer(text)}
        new_blocks = {m[2]: m[3] for m in BLOCK.finditer(new)}
        differing += [f'{path.relative_to(root)}: {n}' for n in names
                      if old_blocks.get(n) != new_blocks.get(n)]
        if not check:
            path.write_text(new)
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--check', action='store_true',
                        help='change nothing; exit 1 if a block differs from the stored JSON')
    args = parser.parse_args()
    differing = render(ROOT, check=args.check)
    for line in differing:
        print(('differs: ' if args.check else 'rewrote: ') + line)
    if args.check and differing:
        sys.exit('the docs differ from the stored results: run python -m benchmarks.render')
    if not differing:
        print('every generated block matches the stored results')


if __name__ == '__main__':
    main()
