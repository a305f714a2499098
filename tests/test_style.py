"""The size limits the project keeps (docs/design.md; small modules with one job): no Python
file over 400 lines, no function over 60 lines except the declarative config builders."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ('psd_jax', 'tests', 'configs', 'experiments', 'benchmarks', 'scripts')
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
CONFIG_BUILDERS = {'base_config', 'paper_base', 'get_config'}  # one assignment per key


def python_files():
    files = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob('*.py'))]
    assert len(files) > 50, 'the walk found too few files to mean anything'
    return files


def test_no_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in python_files()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f'files over {MAX_FILE_LINES} lines (split by responsibility): {long}'


def test_no_function_over_the_limit():
    long = {}
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and node.name not in CONFIG_BUILDERS:
                    long[f'{path.relative_to(ROOT)}:{node.name}'] = lines
    assert not long, f'functions over {MAX_FUNCTION_LINES} lines: {long}'
