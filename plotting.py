"""Pictures of samples: scatter plots over the true density for 2-D data, grids for images."""
from __future__ import annotations

import math
import os

import numpy as np

import datasets


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


# Grid lines between images: a blue no grey-level image has, so they never merge with white
# or black pixels.
SEPARATOR_RGB = (0.2, 0.4, 0.8)


def image_grid(x, centered=False, cols=None):
  """[N, H, W, C] in [0, 1] (or [-1, 1]) to one uint8 RGB grid [rows (H + 1) + 1, cols (W + 1)
  + 1, 3], images separated by SEPARATOR_RGB lines (cols: default about sqrt(N))."""
  x = datasets.to_unit_range(np.asarray(x, np.float32), centered)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  n, h, w, c = x.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.empty((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
  grid[...] = SEPARATOR_RGB
  for i in range(n):
    r, k = divmod(i, cols)
    grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = x[i]
  return (grid * 255).round().astype(np.uint8)


def sample_title(dataset, step, n, sampler=None, nfe=None) -> str:
  """A sample picture's title: dataset, step, how many, and (if given) drawn how."""
  how = ''
  if sampler is not None:
    how = f' ({sampler}' + (f', {nfe} NFE' if nfe is not None else '') + ')'
  return f'{dataset}, step {step}: {n} samples{how}'


def save_samples(path, x, dataset, centered=False, log_prob=None, title=None, cols=None):
  """Writes a PNG: a scatter plot (over contours of ``log_prob`` if given) or an image grid,
  titled (default: the dataset and the number of samples)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  x = np.asarray(x)
  plt = _pyplot()
  if x.ndim == 2:
    fig, ax = plt.subplots(figsize=(5, 5))
    lim = float(np.percentile(np.abs(x), 99.5)) * 1.15 + 0.5
    if log_prob is None:
      try:
        import datasets
        log_prob = datasets.toy_log_prob(dataset)
      except Exception:   # a picture without contours is still a picture
        log_prob = None
    if log_prob is not None:
      g = np.linspace(-lim, lim, 200)
      xx, yy = np.meshgrid(g, g)
      lp = np.asarray(log_prob(np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32)))
      ax.contourf(xx, yy, np.exp(lp).reshape(xx.shape), levels=20, cmap='Blues')
    ax.scatter(x[:, 0], x[:, 1], s=2, c='tab:red', alpha=0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect('equal')
    ax.set_title(title or f'{dataset}: {len(x)} samples (red), true density (blue)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
  grid = image_grid(x[:256], centered, cols)
  scale = max(1, -(-500 // max(grid.shape[:2])))   # at least 500 px: 8x8 digits drawn large
  grid = np.kron(grid, np.ones((scale, scale, 1), np.uint8))
  height, width = grid.shape[:2]
  fig = plt.figure(figsize=(width / 100, height / 100 + 0.35), dpi=100)
  ax = fig.add_axes((0, 0, 1, height / (height + 35)))
  ax.imshow(grid, interpolation='nearest')
  ax.axis('off')
  fig.suptitle(title or f'{dataset}: {min(len(x), 256)} samples', fontsize=10,
               y=1 - 10 / (height + 35), va='top')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
