"""The stored results and the docs agree: every results JSON names the commit and command that
produced it, and every generated block of README.md and docs/ is what benchmarks/render.py
writes from those JSON files today."""

from __future__ import annotations

import json
import pathlib

import pytest

from benchmarks import render, tables

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = sorted([*(ROOT / 'benchmarks' / 'results').glob('*.json'),
                  *(ROOT / 'docs' / 'results').glob('*.json')])


def records(result: dict) -> list[dict]:
    """The parts of a results JSON that carry provenance: the file itself, or each of its parts
    when it gathers the results of several commands (fit.json's runs, eval_parity.json's
    checks); every part that holds figures must then name its own."""
    if 'command' in result:
        return [result]
    parts = result['runs'] if isinstance(result.get('runs'), dict) else result
    return [v for v in parts.values() if isinstance(v, dict)]


@pytest.mark.parametrize('path', RESULTS, ids=lambda p: p.name)
def test_each_results_json_names_its_commit_and_command(path):
    found = records(json.loads(path.read_text()))
    assert found, path.name
    for record in found:
        for key in ('commit', 'command'):
            assert isinstance(record.get(key), str) and record[key].strip(), (path.name, key)
        assert record['commit'].rstrip('+').isalnum(), (path.name, record['commit'])


def test_every_generated_block_is_what_the_stored_json_gives():
    assert render.render(ROOT, check=True) == []


def test_every_table_is_used_in_the_docs():
    used = {m[2] for path in render.documents(ROOT) for m in
            render.BLOCK.finditer(path.read_text())}
    assert used == set(tables.TABLES)


def test_a_changed_figure_is_found(tmp_path):
    """The check is not vacuous: a doc whose block was edited by hand differs."""
    (tmp_path / 'benchmarks').symlink_to(ROOT / 'benchmarks')
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'results').symlink_to(ROOT / 'docs' / 'results')
    text = (ROOT / 'README.md').read_text()
    block = next(render.BLOCK.finditer(text))
    edited = text.replace(block[3], block[3].replace('|', '| 9', 1), 1)
    (tmp_path / 'README.md').write_text(edited)
    assert render.render(tmp_path, check=True) == [f'README.md: {block[2]}']
    render.render(tmp_path)
    assert (tmp_path / 'README.md').read_text() == text
