"""models/score.py: network outputs to scores, checked against the closed-form score of Gaussian data.

Data x0 ~ N(mu, s0^2 I) perturbed by an SDE to time t have the marginal
N(a mu, (a^2 s0^2 + std^2) I), whose score is -(x - a mu) / (a^2 s0^2 + std^2).
A fake network reads only its label, recovers the noise level from it the way the
reference's networks are trained to, and returns what a perfect network of that
convention returns; the wrapper must turn that into the exact score.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_lib
from models import score as score_lib

MU, S0 = 0.3, 0.7


def _gaussian_score(x, a, var_t):
  return -(x - a[:, None] * MU) / var_t[:, None]


@dataclasses.dataclass(frozen=True)
class _PerfectNetwork:
  """Stands in for a flax module: ``apply(params, x, labels)``."""
  sde: sde_lib.SDE
  continuous: bool

  def apply(self, params, x, labels, **kwargs):
    del params, kwargs
    sde = self.sde
    if isinstance(sde, sde_lib.VESDE):
      if self.continuous:
        sigma = labels                                     # label = sigma(t)
      else:                                                # label = index into descending sigmas
        sigma = sde.discrete_sigmas[::-1][labels.astype(jnp.int32)]
      return _gaussian_score(x, jnp.ones_like(sigma), S0**2 + sigma**2)   # output = score
    if self.continuous:
      t = labels / 999.0
      a, std = sde.marginal_coeffs(t)
    else:
      i = jnp.round(labels).astype(jnp.int32)
      abar = sde.alphas_cumprod[i]
      a, std = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    # Noise prediction: output = -std * score.
    return -std[:, None] * _gaussian_score(x, a, a**2 * S0**2 + std**2)


CASES = [('vesde', True), ('vesde', False), ('vpsde', True), ('vpsde', False), ('subvpsde', True)]


@pytest.mark.parametrize('name,continuous', CASES)
def test_wrapped_perfect_network_gives_the_exact_perturbed_score(name, continuous):
  sde = sde_lib.get_sde(name, N=100)
  key_x, key_t = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(key_x, (64, 3))
  if continuous:
    t = jax.random.uniform(key_t, (64,), minval=1e-3, maxval=1.0)
  else:   # the training times of the discrete losses: t_i = i / (N - 1)
    t = sde.discrete_time(jax.random.randint(key_t, (64,), 0, sde.N))
  score_fn = score_lib.get_reference_score_fn(_PerfectNetwork(sde, continuous), sde, {},
                                              continuous=continuous)
  got = score_fn(x, t)
  if continuous:
    a, std = sde.marginal_coeffs(t)
  elif name == 'vesde':
    i = jnp.round(t * (sde.N - 1)).astype(jnp.int32)
    a, std = jnp.ones_like(t), sde.discrete_sigmas[i]
  else:
    abar = sde.alphas_cumprod[jnp.round(t * (sde.N - 1)).astype(jnp.int32)]
    a, std = jnp.sqrt(abar), jnp.sqrt(1 - abar)
  want = _gaussian_score(x, a, a**2 * S0**2 + std**2)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_discrete_ve_label_indexes_the_descending_sigmas():
  sde = sde_lib.VESDE(N=10)
  t = jnp.arange(10) / 9.0
  labels, std = score_lib.reference_labels(sde, t, continuous=False)
  np.testing.assert_array_equal(np.asarray(labels), np.arange(9, -1, -1))
  assert std is None
  np.testing.assert_allclose(np.asarray(sde.discrete_sigmas[::-1][labels.astype(int)]),
                             np.asarray(sde.discrete_sigmas), rtol=1e-6)


def test_continuous_labels_of_each_sde():
  t = jnp.array([0.1, 0.5, 1.0])
  ve = sde_lib.VESDE()
  labels, _ = score_lib.reference_labels(ve, t, continuous=True)
  np.testing.assert_allclose(np.asarray(labels), 0.01 * 5000.0**np.asarray(t), rtol=1e-5)
  for sde in (sde_lib.VPSDE(), sde_lib.subVPSDE()):
    labels, std = score_lib.reference_labels(sde, t, continuous=True)
    np.testing.assert_allclose(np.asarray(labels), 999 * np.asarray(t), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(std), np.asarray(sde.marginal_coeffs(t)[1]))


def test_subvp_discrete_and_unknown_sdes_fail_clearly():
  with pytest.raises(ValueError, match='sub-VP has no discrete-time network convention'):
    score_lib.reference_labels(sde_lib.subVPSDE(), jnp.zeros(2), continuous=False)

  class OtherSDE(sde_lib.VPSDE):
    pass

  with pytest.raises(ValueError, match='No network convention for OtherSDE'):
    score_lib.reference_labels(OtherSDE(), jnp.zeros(2), continuous=True)


def test_discrete_vp_std_truncates_the_level_on_the_sampling_grid():
  """The reference divides by sqrt(1 - abar[int(t (N - 1))]) (``labels.long()``), in float32.

  On the sampler's grid linspace(1, 1e-3, 1000) rounding picks another level at half the
  times; at the last one (t = 1e-3, level 0) the std must be 0.0100, not 0.0148.
  """
  sde = sde_lib.VPSDE()
  t = np.linspace(1.0, 1e-3, sde.N).astype(np.float32)
  labels, std = score_lib.reference_labels(sde, jnp.asarray(t), continuous=False)
  level = np.trunc(t * np.float32(sde.N - 1)).astype(np.int64)     # torch's .long()
  sqrt_1m_abar = np.sqrt(1.0 - np.asarray(sde.alphas_cumprod, np.float64))
  np.testing.assert_allclose(np.asarray(std), sqrt_1m_abar[level], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(labels), t * np.float32(sde.N - 1), rtol=1e-6)
  assert abs(float(std[-1]) - 0.0100) < 1e-4
  # Our own noise-predicting networks trained with the 'ddpm' loss use the same level.
  _, std_own = score_lib.marginal_for_network(sde, jnp.asarray(t), discrete_ddpm=True)
  np.testing.assert_allclose(np.asarray(std_own), sqrt_1m_abar[level], rtol=1e-6)


@pytest.mark.parametrize('n', [2, 10, 1000, 2000, 10**6])
def test_discrete_time_truncates_back_to_its_level(n):
  """The losses label level i with sde.discrete_time(i); its level must be i, for every i."""
  for sde in (sde_lib.VPSDE(N=n), sde_lib.VESDE(N=n)):
    i = jnp.arange(n)
    t = sde.discrete_time(i)
    np.testing.assert_array_equal(np.asarray(sde.discrete_index(t)), np.arange(n))
    np.testing.assert_allclose(np.asarray(t), np.arange(n) / (n - 1), rtol=0, atol=2e-7)
