"""plotting: image grids with separators no grey level can merge with, drawn at a readable
size under a title; scatter plots of 2-D samples."""
import numpy as np
from PIL import Image

import plotting


def test_grid_places_each_image_between_separator_lines():
  x = np.random.default_rng(0).uniform(0, 1, (5, 4, 3, 1)).astype(np.float32)
  x[0] = 1.0   # a white image beside a separator
  grid = plotting.image_grid(x, cols=3)
  assert grid.shape == (2 * 5 + 1, 3 * 4 + 1, 3) and grid.dtype == np.uint8
  separator = np.round(np.array(plotting.SEPARATOR_RGB) * 255).astype(np.uint8)
  for r in range(0, grid.shape[0], 5):
    assert np.all(grid[r] == separator)
  for c in range(0, grid.shape[1], 4):
    assert np.all(grid[:, c] == separator)
  for i in range(5):
    r, k = divmod(i, 3)
    cell = grid[1 + 5 * r:5 + 5 * r, 1 + 4 * k:4 + 4 * k]
    np.testing.assert_array_equal(cell, np.repeat(np.round(x[i] * 255), 3, -1).astype(np.uint8))
  assert np.all(grid[6:10, 9:12] == separator)   # the empty sixth cell
  # No grey level equals the separator.
  assert len(set(separator.tolist())) == 3
  # Centered data ([-1, 1]) give the same grid; values past the range are clipped.
  centered = plotting.image_grid(2 * x - 1, centered=True, cols=3)
  assert np.abs(centered.astype(int) - grid).max() <= 1   # float rounding at k + 1/2
  np.testing.assert_array_equal(plotting.image_grid(np.full((1, 2, 2, 1), 1.7), cols=1)[1:3, 1:3],
                                255)


def test_small_images_are_drawn_large_under_a_title(tmp_path):
  x = np.random.default_rng(1).uniform(-1, 1, (64, 8, 8, 1))
  path = plotting.save_samples(str(tmp_path / 'd.png'), x, 'digits', centered=True,
                               title='digits, step 400')
  width, height = Image.open(path).size
  assert width >= 500 and height > width   # 8x8 digits, upscaled; a title band above
  path = plotting.save_samples(str(tmp_path / 'p.png'), np.random.default_rng(2).normal(size=(50, 2)),
                               'gaussian_mixture')
  assert Image.open(path).size == (500, 500)
  # 256 MNIST-size images: a 465 px grid, drawn at twice that.
  path = plotting.save_samples(str(tmp_path / 'm.png'), np.zeros((256, 28, 28, 1)), 'mnist')
  assert Image.open(path).size[0] == 2 * (16 * 29 + 1)
