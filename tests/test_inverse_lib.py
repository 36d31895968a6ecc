"""inverse_lib.py (--mode inverse) and the image fidelity metrics it reports (evaluation.py)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import evaluation
import inverse_lib
import train_lib
from configs import base
from run_helpers import tiny_digits_config


def test_psnr_and_ssim_closed_forms():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (3, 8, 8, 1))
  np.testing.assert_allclose(evaluation.psnr(x, x + 0.1), 20.0, rtol=1e-9)   # MSE 0.01
  np.testing.assert_allclose(evaluation.ssim(x, x), 1.0, rtol=1e-12)
  # Constant images: no variance, so SSIM is the luminance term alone.
  a, b = np.full((1, 8, 8, 1), 0.2), np.full((1, 8, 8, 1), 0.6)
  c1 = 0.01**2
  np.testing.assert_allclose(evaluation.ssim(a, b), (2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1),
                             rtol=1e-9)
  noisy = [evaluation.ssim(x, np.clip(x + s * rng.standard_normal(x.shape), 0, 1)).mean()
           for s in (0.05, 0.2, 0.5)]
  assert noisy[0] > noisy[1] > noisy[2]
  np.testing.assert_allclose(evaluation.ssim(x, 1 - x), evaluation.ssim(1 - x, x), rtol=1e-12)


def _inverse_section(**overrides):
  inv = base.get_config().inverse
  inv.unlock()
  inv.update(overrides)
  return inv


@pytest.mark.parametrize('task', inverse_lib.TASKS)
def test_every_task_makes_its_operator(task):
  shape = (8, 8, 3)
  op = inverse_lib.make_operator(_inverse_section(task=task), shape, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2,) + shape)
  y = op.forward(x)
  np.testing.assert_allclose(op.forward(op.pinv(y)), y, rtol=2e-3, atol=2e-3)


def test_bad_inverse_settings_fail_clearly():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r'colorization needs colour images \(data.num_channels=3\)'):
    inverse_lib.make_operator(_inverse_section(task='colorization'), (8, 8, 1), key)
  with pytest.raises(ValueError, match="Unknown inverse.task 'deblur'"):
    inverse_lib.make_operator(_inverse_section(task='deblur'), (8, 8, 1), key)
  with pytest.raises(ValueError, match="inverse.mask must be 'half' or 'random'"):
    inverse_lib.make_operator(_inverse_section(mask='box'), (8, 8, 1), key)


def test_nearest_training_image_baseline_finds_a_measured_training_image():
  train = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (50, 8, 8, 1)))
  op = inverse_lib.make_operator(_inverse_section(task='super_resolution'), (8, 8, 1), None)
  y = op.forward(jnp.asarray(train[[7, 31]]))
  out = inverse_lib.baselines(op, y, train, 0.0, 1.0)
  np.testing.assert_array_equal(out['nearest_training_image'], train[[7, 31]])
  np.testing.assert_allclose(op.forward(jnp.asarray(out['mean_fill'])), y, atol=1e-5)


@pytest.fixture(scope='module')
def tiny_model(data_dir, tmp_path_factory):
  """A 2-step digits model, trained once for the mode's tests."""
  config = tiny_digits_config(data_dir)
  config.sde.num_scales = 25    # VP's Langevin step needs N >= 20 (alpha = 1 - beta_max / N >= 0)
  workdir = str(tmp_path_factory.mktemp('inverse'))
  train_lib.train(config, workdir)
  return config, workdir


@pytest.mark.slow
@pytest.mark.parametrize('task,method', [('inpainting', 'imputation'), ('mri', 'dps')])
def test_inverse_mode_writes_picture_and_report(tiny_model, task, method):
  """The mode end to end on a 2-step digits model: the mechanics and the exact consistency of
  a noiseless imputation, not the quality (the benchmark measures that)."""
  config, workdir = tiny_model
  config = config.copy_and_resolve_references()
  config.inverse.update(task=task, method=method, num_examples=3, samples_per_example=2)
  report = json.load(open(inverse_lib.inverse(config, workdir)))
  assert report['nfe'] == config.sde.num_scales * (2 if method == 'imputation' else 1)
  assert os.path.isfile(report['picture']) and report['all_finite']
  assert set(report['baselines']) == {'pseudo_inverse', 'mean_fill', 'nearest_training_image'}
  for part in [report['samples'], report['posterior_mean'], *report['baselines'].values()]:
    assert np.isfinite(part['psnr']) and -1 <= part['ssim'] <= 1
  assert report['truth_consistency_rms'] < 1e-5
  if method == 'imputation':
    assert report['consistency_rms'] < 1e-5
