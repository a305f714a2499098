"""The Colab notebook executes top to bottom (fast mode: 20 training steps) on the data the
README's set-up fetched; the committed file carries no outputs."""

from __future__ import annotations

import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'psd_jax_colab.ipynb'
nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

pytestmark = pytest.mark.skipif(
    not (pathlib.Path(os.environ.get('PSD_JAX_CACHE', pathlib.Path.home() / '.cache' /
                                     'psd_jax')) / 'emoji_sources' / '.complete').exists(),
    reason='emoji data absent: run `python -m psd_jax.data.fetch`')


def test_committed_notebook_has_clean_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == 'code':
            assert not cell.outputs and cell.execution_count is None


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv('PSD_JAX_NOTEBOOK_STEPS', '20')
    monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                     resources={'metadata': {'path': str(tmp_path)}})
    client.execute()
    text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                     for o in c.outputs)
    assert 'eval/retrieval/i2t_R@1' in text and 'top-1' in text
