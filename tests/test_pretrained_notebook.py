"""docs/pretrained.ipynb runs top to bottom on a fresh kernel, at small sizes, on both routes:
importing a released checkpoint, and (its default) training the README's digits model.

On the import route, the notebook imports a checkpoint in the reference's real format: the
tiny score_sde_pytorch NCSN++ (VE, continuous, Fourier features) of tests/fixtures, made by
the reference's own training code (scripts/make_import_fixtures.py), under the config it was
trained with (configs/ve/cifar10_ncsnpp_continuous.py shrunk as in
tests/test_checkpoint_import.py). Its test images are the offline 'photos' patches, which have
that model's 16x16x3 shape. The tests read what the notebook printed: the NFE each sampler's
settings imply, finite bits/dim, and the posterior samplers' NFE.

Between them the two routes run every sampler of sampling.SAMPLERS, each once: the paper's
(PC and the adaptive ODE) on the imported VE network, the few-step solvers on the trained VP
digits network.
"""
import json
import math
import os
import re

import numpy as np
import pytest

import datasets
import sampling
from scripts import run_notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'docs', 'pretrained.ipynb')
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')


def _fixture_overrides(tag):
  """The config fields that shrink the fixture's config to the network it was made with."""
  meta = json.loads(str(np.load(os.path.join(FIXTURES, f'import_{tag}.npz'))['meta']))
  out = {}
  for key, value in meta['overrides'].items():
    value = tuple(value) if isinstance(value, list) else value
    out['data.image_size' if key == 'image_size' else f'model.{key}'] = value
  return meta['config'][len('configs.'):].replace('.', '/'), out


PAPER_SAMPLERS = ('pc', 'ode')
FAST_SAMPLERS = tuple(n for n in sampling.SAMPLERS if n not in PAPER_SAMPLERS)


def _sampler_nfe(text):
  """The sampler table the notebook printed: {name: NFE}, in its order."""
  return {m[1]: int(m[2]) for m in re.finditer(r'^(\w+) +(\d+) +[\d.]+$', text, re.M)}


def _pictures(nb):
  return [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs
          if 'image/png' in o.get('data', {})]


def _stdout(nb):
  return ''.join(o.get('text', '') for cell in nb.cells if cell.cell_type == 'code'
                 for o in cell.outputs if o.output_type == 'stream' and o.name == 'stdout')


@pytest.mark.slow
def test_pretrained_notebook_imports_a_reference_checkpoint_and_uses_it(tmp_path, data_dir):
  config_name, overrides = _fixture_overrides('torch_ve_ncsnpp_continuous')
  assert config_name == 've/cifar10_ncsnpp_continuous'
  sizes = dict(NUM_SAMPLES=4, PC_STEPS=3, ODE_TOL=1e-2, FAST_STEPS=3, BPD_IMAGES=2, BPD_TOL=1e-2,
               INVERSE_STEPS=3, INVERSE_EXAMPLES=2, INVERSE_SAMPLES=2)
  params = dict(CHECKPOINT=os.path.join(FIXTURES, 'import_torch_ve_ncsnpp_continuous.pth'),
                CHECKPOINT_CONFIG=config_name, CONFIG_OVERRIDES=overrides, DATASET='photos',
                WORKDIR=str(tmp_path / 'imported'), SAMPLERS=list(PAPER_SAMPLERS), **sizes)
  nb = run_notebook.execute(NOTEBOOK, params, env={datasets.DATA_DIR_ENV: data_dir})
  text = _stdout(nb)

  assert 'Imported step 7 of' in text
  assert os.path.isdir(tmp_path / 'imported' / 'checkpoints' / 'snapshots' / '7')
  assert 'VESDE, step 7, data (16, 16, 3)' in text

  # The sampler table: name, NFE, seconds; each with the NFE of its settings.
  nfe = _sampler_nfe(text)
  assert list(nfe) == list(PAPER_SAMPLERS)
  assert nfe['pc'] == 2 * sizes['PC_STEPS']   # reverse diffusion + Langevin, one each per step
  assert nfe['ode'] > 0

  # Bits/dim: finite and positive, the mean and each image's.
  m = re.search(r'bits/dim of (\d+) test images: ([-\d.]+) \+- ([\d.]+) \(NFE (\d+)', text)
  assert m and int(m[1]) == sizes['BPD_IMAGES'] and int(m[4]) > 0
  per_image = [float(v) for v in re.search(r'per image: (.*)', text)[1].split()]
  assert len(per_image) == sizes['BPD_IMAGES']
  assert all(math.isfinite(v) and v > 0 for v in per_image + [float(m[2])])

  # The imported model has colour: it also colorizes (no photos model is trained).
  n = sizes['INVERSE_EXAMPLES'] * sizes['INVERSE_SAMPLES']
  for task in ('inpainting', 'colorization'):
    assert f'{task}: {n} posterior samples, {2 * sizes["INVERSE_STEPS"]} NFE' in text, task
  assert 'photos model at step' not in text

  assert len(_pictures(nb)) == 4   # a sampler grid, the bits/dim images, two inverse problems


@pytest.mark.slow
def test_pretrained_notebook_trains_the_digits_model_by_default(tmp_path, data_dir):
  """The default route (CHECKPOINT = None): the notebook trains configs/vp/digits.py through
  run_lib.run into WORKDIR, samples, computes bits/dim and inpaints with it, and, the digits
  being grey, trains the photos model for colorization. Sizes: 2 training steps each, a
  narrow network, the few-step solvers (PC and the ODE run on the import route); 25 PC steps,
  as VP's discrete Langevin step needs N >= beta_max = 20."""
  sizes = dict(TRAIN_STEPS=2, TRAIN_BATCH=8, TRAIN_WARMUP=1, PHOTOS_TRAIN_STEPS=2,
               SAMPLERS=list(FAST_SAMPLERS), NUM_SAMPLES=4, PC_STEPS=25, FAST_STEPS=3, BPD_IMAGES=2,
               BPD_TOL=1e-2, INVERSE_STEPS=25, INVERSE_EXAMPLES=2, INVERSE_SAMPLES=2)
  narrow = {'model.nf': 8, 'model.ch_mult': (1,)}
  params = dict(CONFIG_OVERRIDES=narrow, PHOTOS_CONFIG_OVERRIDES={'data.image_size': 8, **narrow},
                WORKDIR=str(tmp_path / 'digits'), PHOTOS_WORKDIR=str(tmp_path / 'photos'), **sizes)
  nb = run_notebook.execute(NOTEBOOK, params, env={datasets.DATA_DIR_ENV: data_dir})
  text = _stdout(nb)

  assert 'Imported' not in text
  for workdir in ('digits', 'photos'):
    assert os.path.isdir(tmp_path / workdir / 'checkpoints' / 'snapshots' / '2'), workdir
  assert 'VPSDE, step 2, data (8, 8, 1)' in text
  nfe = _sampler_nfe(text)
  assert list(nfe) == list(FAST_SAMPLERS)
  steps = sizes['FAST_STEPS']
  for name in ('ddim', 'dpm_solver_2m', 'dpm_solver_3m', 'unipc'):
    assert nfe[name] == steps + 1, name      # one per step, one to denoise
  for name in ('heun', 'dpm_solver_2s'):
    assert nfe[name] == 2 * steps + 1, name  # two per step, one to denoise
  m = re.search(r'bits/dim of (\d+) test images: ([-\d.]+) \+- ([\d.]+) \(NFE (\d+)', text)
  assert m and int(m[1]) == sizes['BPD_IMAGES'] and math.isfinite(float(m[2]))
  # The grey digits model inpaints; colorization trains the photos model at 8x8 first.
  n = sizes['INVERSE_EXAMPLES'] * sizes['INVERSE_SAMPLES']
  assert f'inpainting: {n} posterior samples, {2 * sizes["INVERSE_STEPS"]} NFE' in text
  assert 'photos model at step 2, ready after' in text
  assert f'colorization: {n} posterior samples, {2 * sizes["INVERSE_STEPS"]} NFE' in text
  # Two sampler grids (four a row), the bits/dim images, inpainting, the photos model's
  # samples, colorization.
  assert len(_pictures(nb)) == 6
