"""Shared test settings: silent broadcasting raises, and helpers over the analytic mixture."""
import jax
import numpy as np
import pytest

jax.config.update('jax_numpy_rank_promotion', 'raise')

import gaussian_mixture  # noqa: E402
import sde_lib  # noqa: E402

SDE_NAMES = ('vesde', 'vpsde', 'subvpsde')


@pytest.fixture
def x64():
  """Runs a test in float64, restoring float32 afterwards.

  Compiled functions are dropped on both sides of the switch, so that nothing traced in
  one precision is reused in the other (x64 is meant to be set once, at start-up).
  """
  jax.clear_caches()
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', False)
    jax.clear_caches()


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """Where the embedded datasets (toy, digits) are generated once for the whole session."""
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='session')
def mixture():
  return gaussian_mixture.two_dimensional_example()


def mixture_statistics(mix, x):
  """Mode weights [K], per-mode means [K, D] and covariances [K, D, D] of samples x."""
  labels = np.asarray(mix.assign(jax.numpy.asarray(x, jax.numpy.float32)))
  x = np.asarray(x, np.float64)
  k = mix.weights.shape[0]
  weights = np.bincount(labels, minlength=k) / len(labels)
  means = np.stack([x[labels == i].mean(0) for i in range(k)])
  covs = np.stack([np.cov(x[labels == i].T) for i in range(k)])
  return weights, means, covs


def assert_matches_mixture(mix, x, weight_tol, mean_tol, cov_tol):
  assert np.all(np.isfinite(np.asarray(x))), 'samples contain NaN or inf'
  weights, means, covs = mixture_statistics(mix, x)
  np.testing.assert_allclose(weights, np.asarray(mix.weights), atol=weight_tol, err_msg='mode weights')
  np.testing.assert_allclose(means, np.asarray(mix.means), atol=mean_tol, err_msg='mode means')
  np.testing.assert_allclose(covs, np.asarray(mix.covs), atol=cov_tol, err_msg='mode covariances')


def make_sde(name, **kwargs):
  return sde_lib.get_sde(name, **kwargs)
