"""docs/tutorial.ipynb runs top to bottom on a fresh kernel, through scripts/make_figures.py,
and writes every figure of figures.FIGURE_NAMES."""
import json
import os
import re

import nbformat
import pytest

import datasets
import figures
from scripts import make_figures


def _text_outputs(nb):
  out = []
  for cell in nb.cells:
    for o in cell.get('outputs', []):
      if o.get('output_type') == 'stream':
        out.append(o['text'])
      elif 'text/plain' in o.get('data', {}):
        out.append(o['data']['text/plain'])
  return '\n'.join(out)


def _image_outputs(nb):
  return sum('image/png' in o.get('data', {}) for c in nb.cells for o in c.get('outputs', []))


@pytest.mark.slow
def test_tutorial_runs_and_make_figures_writes_every_figure(data_dir, tmp_path):
  out = tmp_path / 'figures'
  nb = make_figures.make_all('small', str(out), env={
      datasets.DATA_DIR_ENV: data_dir, 'SCORE_SDE_TUTORIAL_DIR': str(tmp_path / 'runs')})
  for name in figures.FIGURE_NAMES:
    assert (out / f'{name}.png').stat().st_size > 1000, name
  assert sorted(p.name for p in out.iterdir()) == sorted(f'{n}.png' for n in figures.FIGURE_NAMES)
  # Each figure is also shown in the notebook, from the same call.
  assert _image_outputs(nb) == len(figures.FIGURE_NAMES)
  text = _text_outputs(nb)
  assert "sizes (small)" in text
  # The few-step solvers report the evaluations they made: DDIM one per step plus the final
  # denoising step, Heun two per step plus the denoising step.
  for steps in figures.SIZES['small']['fast_steps']:
    assert re.search(rf'ddim_{steps}: +{steps + 1} NFE', text), text
    assert re.search(rf'heun_{steps}: +{2 * steps + 1} NFE', text), text
  # The executed notebook is a valid notebook with no error output.
  nbformat.validate(nb)
  assert not [o for c in nb.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']


def test_committed_tutorial_has_its_outputs_and_figures():
  """The committed notebook reads on the repository's page: every code cell ran, in order,
  and every figure it saves is in docs/figures."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  nb = nbformat.read(os.path.join(root, 'docs', 'tutorial.ipynb'), as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  counts = [c.execution_count for c in code]
  assert all(isinstance(n, int) for n in counts) and counts == sorted(counts), counts
  assert _image_outputs(nb) == len(figures.FIGURE_NAMES)
  # Its own parameters are the full sizes, with no cell injected over them.
  assert not [c for c in code if 'injected-parameters' in c.metadata.get('tags', [])]
  assert "SIZE = 'full'" in code[0].source and 'parameters' in code[0].metadata.tags
  for name in figures.FIGURE_NAMES:
    assert os.path.getsize(os.path.join(root, 'docs', 'figures', f'{name}.png')) > 1000, name
  json.dumps(nb)   # serializable as committed
