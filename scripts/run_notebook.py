"""Executes a notebook of docs/ on a fresh kernel, optionally with other parameters.

Each notebook's first code cell carries the tag ``parameters`` (papermill's convention) and
sets its sizes. Overrides go into a cell inserted right after it, so the notebook reads the
same either way. The tests run the notebooks with small sizes; the committed outputs come from
``python scripts/run_notebook.py docs/tutorial.ipynb --in_place`` at the notebook's own sizes.

  python scripts/run_notebook.py docs/tutorial.ipynb --set STEPS_SCALE=0.1 --out /tmp/t.ipynb
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parameter_cell_index(nb):
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code' and 'parameters' in cell.get('metadata', {}).get('tags', []):
      return i
  raise ValueError('the notebook has no code cell tagged "parameters"')


def execute(path: str, overrides: dict | None = None, out_path: str | None = None,
            timeout: int = 1200, env: dict | None = None):
  """Runs the notebook at ``path`` top to bottom; returns the executed notebook.

  Raises nbclient's CellExecutionError (naming the cell and the traceback) on any error.
  ``overrides`` maps parameter names to Python values; ``out_path`` writes the result.
  """
  import nbclient
  import nbformat

  nb = nbformat.read(path, as_version=4)
  # A notebook written back by an earlier run keeps its injected cell: replace, not add.
  nb.cells = [c for c in nb.cells
              if 'injected-parameters' not in c.get('metadata', {}).get('tags', [])]
  if overrides:
    lines = [f'{name} = {value!r}' for name, value in overrides.items()]
    cell = nbformat.v4.new_code_cell('# Parameters set by scripts/run_notebook.py\n' +
                                     '\n'.join(lines), metadata={'tags': ['injected-parameters']})
    nb.cells.insert(_parameter_cell_index(nb) + 1, cell)
  # The kernel runs in the repository root, so that the notebook imports the library as
  # the README's commands do; ``env`` (where data are generated, ...) is the kernel's alone:
  # this process's environment is left as it is.
  kernel_env = dict(os.environ, **(env or {}))
  kernel_env['PYTHONPATH'] = ROOT + os.pathsep + kernel_env.get('PYTHONPATH', '')
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                                   resources={'metadata': {'path': ROOT}})
  client.execute(env=kernel_env)
  if out_path:
    nbformat.write(nb, out_path)
  return nb


def _parse_value(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('notebook')
  parser.add_argument('--set', action='append', default=[], metavar='NAME=VALUE',
                      help='override a parameter of the notebook (a Python literal)')
  parser.add_argument('--out', help='where to write the executed notebook')
  parser.add_argument('--in_place', action='store_true', help='write the outputs into the notebook')
  args = parser.parse_args(argv)
  overrides = {}
  for item in args.set:
    name, sep, value = item.partition('=')
    if not sep:
      parser.error(f'--set takes NAME=VALUE, got {item!r}')
    overrides[name] = _parse_value(value)
  if args.in_place and overrides:
    parser.error('--in_place keeps the notebook\'s own parameters; use --out with --set')
  out = args.notebook if args.in_place else args.out
  t0 = time.time()
  execute(args.notebook, overrides, out)
  print(f'{args.notebook} ran in {time.time() - t0:.0f} s' + (f'; wrote {out}' if out else ''))


if __name__ == '__main__':
  sys.exit(main())
