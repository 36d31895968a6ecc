"""The analytic mixture itself against scipy and autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import gaussian_mixture
from conftest import SDE_NAMES, make_sde


def test_log_prob_matches_scipy(mixture):
  x = jax.random.normal(jax.random.PRNGKey(0), (50, 2)) * 2
  dens = sum(w * scipy.stats.multivariate_normal(m, c).pdf(np.asarray(x, np.float64))
             for w, m, c in zip(np.asarray(mixture.weights), np.asarray(mixture.means),
                                np.asarray(mixture.covs, np.float64)))
  np.testing.assert_allclose(mixture.log_prob(x), np.log(dens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', SDE_NAMES)
def test_perturbed_score_is_gradient_of_perturbed_log_prob(mixture, name):
  sde = make_sde(name)
  x = jax.random.normal(jax.random.PRNGKey(0), (20, 2)) * 2
  t = jnp.linspace(0.01, 1.0, 20)
  grad = jax.grad(lambda x: mixture.perturbed_log_prob(sde, x, t).sum())(x)
  np.testing.assert_allclose(mixture.perturbed_score(sde, x, t), grad, rtol=1e-4, atol=1e-5)


def test_perturbed_density_is_the_convolution(mixture):
  """Under VP at t, p_t is the law of a x0 + std z: compare with a Monte Carlo histogram mean."""
  sde = make_sde('vpsde')
  t = jnp.full((200_000,), 0.2)
  x0 = mixture.sample(jax.random.PRNGKey(0), 200_000)
  mean, std = sde.marginal_prob(x0, t)
  xt = mean + std[:, None] * jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  # E_{p_t}[log p_t] (negative entropy) estimated from samples vs. its own quadrature.
  lp = np.asarray(mixture.perturbed_log_prob(sde, xt, t), np.float64)
  grid = np.stack(np.meshgrid(np.linspace(-6, 6, 601), np.linspace(-6, 6, 601)), -1).reshape(-1, 2)
  lg = np.asarray(mixture.perturbed_log_prob(sde, jnp.asarray(grid, jnp.float32), jnp.full((len(grid),), 0.2)), np.float64)
  cell = (12 / 600)**2
  assert abs(np.exp(lg).sum() * cell - 1) < 1e-3                 # normalized
  np.testing.assert_allclose(lp.mean(), (np.exp(lg) * lg).sum() * cell, atol=5 * lp.std() / np.sqrt(len(lp)))


def test_sample_moments(mixture):
  x = np.asarray(mixture.sample(jax.random.PRNGKey(0), 100_000), np.float64)
  w = np.asarray(mixture.weights)[:, None]
  mean = (w * np.asarray(mixture.means)).sum(0)
  np.testing.assert_allclose(x.mean(0), mean, atol=0.02)


def test_diagonal_mixture_on_images():
  means = jnp.stack([jnp.zeros((4, 4, 3)), jnp.ones((4, 4, 3))])
  g = gaussian_mixture.GaussianMixture.from_diag([0.5, 0.5], means, jnp.full((2, 4, 4, 3), 0.1))
  x = g.sample(jax.random.PRNGKey(0), 6)
  assert x.shape == (6, 4, 4, 3)
  sde = make_sde('vesde')
  t = jnp.full((6,), 0.3)
  s = g.perturbed_score(sde, x, t)
  grad = jax.grad(lambda x: g.perturbed_log_prob(sde, x, t).sum())(x)
  np.testing.assert_allclose(s, grad, rtol=1e-4, atol=1e-5)
