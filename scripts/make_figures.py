"""Writes docs/figures/*.png by running docs/tutorial.ipynb, whose cells make them.

Every figure is one function of figures.py, called by one cell of the tutorial; this script
executes the notebook on a fresh kernel with ``FIGURES_DIR`` set, so each figure is saved as
the notebook shows it, from the same call. At full size it also writes the executed notebook
back (the committed outputs and the figures then come from one run).

  python scripts/make_figures.py                   # full size: docs/figures and the notebook
  python scripts/make_figures.py --size small --out /tmp/figs   # the tests' sizes, no notebook

Trained models go to $SCORE_SDE_TUTORIAL_DIR (default: under the system's temporary
directory), one directory per size, and are reused by later runs of the same size.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import figures  # noqa: E402
from scripts import run_notebook  # noqa: E402

NOTEBOOK = os.path.join(ROOT, 'docs', 'tutorial.ipynb')
FIGURES_DIR = os.path.join(ROOT, 'docs', 'figures')


def make_all(size: str = 'full', out_dir: str = FIGURES_DIR, notebook_out: str | None = None,
             env: dict | None = None):
  """Runs the tutorial at ``size`` writing every figure of figures.FIGURE_NAMES into out_dir;
  returns the executed notebook. Raises if a cell fails or a figure is missing."""
  if size not in figures.SIZES:
    raise ValueError(f'unknown size {size!r}; valid: {sorted(figures.SIZES)}')
  out_dir = os.path.abspath(out_dir)
  # The kernel runs in the repository root: a path inside it is written relative, so that
  # the committed notebook names docs/figures, not this machine's checkout.
  inside = os.path.commonpath([out_dir, ROOT]) == ROOT
  env = dict(env or {}, SCORE_SDE_FIGURES_DIR=os.path.relpath(out_dir, ROOT) if inside else out_dir)
  # The notebook's own sizes are 'full': the committed notebook then carries no injected cell.
  overrides = {} if size == 'full' else {'SIZE': size}
  nb = run_notebook.execute(NOTEBOOK, overrides, notebook_out, env=env)
  paths = {n: os.path.join(out_dir, n + '.png') for n in figures.FIGURE_NAMES}
  missing = [n for n, p in paths.items() if not os.path.exists(p) or os.path.getsize(p) == 0]
  if missing:
    raise RuntimeError(f'the tutorial did not write {missing} into {out_dir}')
  return nb


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', choices=sorted(figures.SIZES), default='full')
  parser.add_argument('--out', default=FIGURES_DIR, help='where the PNG files go')
  parser.add_argument('--notebook_out', default=None,
                      help='where the executed notebook goes (default: docs/tutorial.ipynb '
                           'itself at full size, nowhere otherwise)')
  args = parser.parse_args(argv)
  notebook_out = args.notebook_out or (NOTEBOOK if args.size == 'full' else None)
  t0 = time.time()
  make_all(args.size, args.out, notebook_out)
  print(f'{len(figures.FIGURE_NAMES)} figures in {args.out} ({time.time() - t0:.0f} s)'
        + (f'; executed notebook: {notebook_out}' if notebook_out else ''))


if __name__ == '__main__':
  main()
