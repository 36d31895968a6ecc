"""Probability-flow likelihoods against the closed-form density of a perturbed mixture."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import likelihood
from conftest import SDE_NAMES, make_sde

EPS = 1e-5


def _true_prior(mix, sde):
  """log p_T of the perturbed mixture: isolates the ODE error from the prior mismatch."""
  return lambda z: mix.perturbed_log_prob(sde, z, jnp.full(z.shape[:1], sde.T))


def _exact_logp(mix, sde, x):
  return mix.perturbed_log_prob(sde, x, jnp.full(x.shape[:1], EPS))


def _max_error(mix, sde, x, **kwargs):
  """The worst example's |log p - exact log p_eps| (nats), exact divergence and exact p_T."""
  fn = likelihood.get_likelihood_fn(sde, hutchinson_type='exact', eps=EPS,
                                    prior_logp=_true_prior(mix, sde), **kwargs)
  result = fn(jax.random.PRNGKey(0), mix.score_fn(sde), x)
  err = np.abs(np.asarray(result.logp, np.float64) - np.asarray(_exact_logp(mix, sde, x), np.float64))
  return err.max(), err.mean(), result


@pytest.mark.parametrize('name', SDE_NAMES)
def test_exact_divergence_float32(mixture, name):
  """Every one of 1000 points within 0.01 nats of the exact log-density, float32, default tolerances.

  The max over the batch is what is bounded: with the batch's RMS as the error norm, the
  mean stays near 1e-4 while single points drift by 2e-2 to 3e-2 nats on these points.
  """
  sde = make_sde(name)
  x = mixture.sample(jax.random.PRNGKey(0), 1000)
  max_err, _, result = _max_error(mixture, sde, x)
  assert max_err <= 0.01, f'{name}: max error {max_err:.2e} nats'
  assert result.z.shape == x.shape
  # Continuous data: bits/dim is -log p / (D ln 2), no offset.
  np.testing.assert_allclose(result.bpd, -result.logp / (2 * math.log(2)), rtol=1e-6)


@pytest.mark.parametrize('name', SDE_NAMES)
def test_exact_divergence_float64(mixture, name, x64):
  """Every one of 1000 points within 1e-4 nats in float64 at rtol = atol = 1e-6.

  (At the default 1e-5 the truncation error allowed per example is about 6e-4 nats, in
  float64 as in float32; the batch's RMS norm at 1e-6 leaves points 1.6e-3 off.)
  """
  sde = make_sde(name)
  x = jnp.asarray(mixture.sample(jax.random.PRNGKey(0), 1000), jnp.float64)
  max_err, _, result = _max_error(mixture, sde, x, rtol=1e-6, atol=1e-6)
  assert result.logp.dtype == jnp.float64
  assert max_err <= 1e-4, f'{name}: max error {max_err:.2e} nats'


def test_batch_rms_norm_lets_one_example_drift(mixture):
  """The old error norm on the same points: a good mean hides a bad worst case."""
  sde = make_sde('vpsde')
  x = mixture.sample(jax.random.PRNGKey(0), 1000)
  max_err, mean_err, old = _max_error(mixture, sde, x, error_norm='batch_rms')
  assert mean_err < 1e-3 and max_err > 0.01
  max_new, _, new = _max_error(mixture, sde, x)
  assert max_new < max_err / 10
  assert int(new.nfe) > int(old.nfe)    # per-example control costs evaluations


@pytest.mark.parametrize('name', SDE_NAMES)
def test_default_prior_differs_by_the_prior_mismatch(mixture, name):
  """With the SDE's prior, the result moves by exactly log N(z) - log p_T(z)."""
  sde = make_sde(name)
  x = mixture.sample(jax.random.PRNGKey(1), 100)
  true_prior = _true_prior(mixture, sde)
  kwargs = dict(hutchinson_type='exact', eps=EPS)
  ours = likelihood.get_likelihood_fn(sde, **kwargs)(jax.random.PRNGKey(0), mixture.score_fn(sde), x)
  exact = likelihood.get_likelihood_fn(sde, prior_logp=true_prior, **kwargs)(
      jax.random.PRNGKey(0), mixture.score_fn(sde), x)
  np.testing.assert_allclose(ours.z, exact.z)
  np.testing.assert_allclose(ours.logp - exact.logp, sde.prior_logp(ours.z) - true_prior(ours.z),
                             atol=1e-4)


@pytest.mark.parametrize('hutchinson_type', ['rademacher', 'gaussian'])
def test_hutchinson_estimate_is_unbiased(mixture, hutchinson_type):
  """One point, 2000 independent probes: the mean is the exact log-density within 5 s.e."""
  sde = make_sde('vpsde')
  x = jnp.broadcast_to(jnp.array([[1.0, -1.0]]), (2000, 2))
  fn = likelihood.get_likelihood_fn(sde, hutchinson_type=hutchinson_type, eps=EPS,
                                    prior_logp=_true_prior(mixture, sde))
  logp = np.asarray(fn(jax.random.PRNGKey(0), mixture.score_fn(sde), x).logp, np.float64)
  exact = float(_exact_logp(mixture, sde, x[:1])[0])
  se = logp.std() / np.sqrt(len(logp))
  assert logp.std() > 0.01          # the probes really differ
  assert abs(logp.mean() - exact) < 5 * se + 2e-3


@pytest.mark.parametrize('name', SDE_NAMES)
def test_decode_inverts_encode(mixture, name, x64):
  sde = make_sde(name)
  x = jnp.asarray(mixture.sample(jax.random.PRNGKey(2), 64), jnp.float64)
  score_fn = mixture.score_fn(sde)
  z, nfe = likelihood.encode(sde, score_fn, x, rtol=1e-9, atol=1e-9)
  assert int(nfe) > 0
  assert float(jnp.std(z)) > 0.5 * sde.prior_std   # the code lives at the prior's scale
  x_back, _ = likelihood.decode(sde, score_fn, z, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(x_back, x, atol=1e-5)


def test_encode_matches_likelihood_latent(mixture):
  sde = make_sde('subvpsde')
  x = mixture.sample(jax.random.PRNGKey(3), 32)
  z, _ = likelihood.encode(sde, mixture.score_fn(sde), x, eps=EPS)
  result = likelihood.get_likelihood_fn(sde, hutchinson_type='exact', eps=EPS)(
      jax.random.PRNGKey(0), mixture.score_fn(sde), x)
  np.testing.assert_allclose(z, result.z, atol=2e-3)


def test_nfe_counts_real_evaluations(mixture):
  sde = make_sde('vpsde')
  count = [0]

  def score_fn(x, t):
    jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
    return mixture.perturbed_score(sde, x, t)

  result = likelihood.get_likelihood_fn(sde, rtol=1e-4, atol=1e-4)(
      jax.random.PRNGKey(0), score_fn, mixture.sample(jax.random.PRNGKey(1), 8))
  jax.block_until_ready(result.logp)
  jax.effects_barrier()
  assert count[0] == int(result.nfe)


def test_bits_per_dim_offsets():
  assert likelihood.bits_per_dim_offset(None) == 0.0
  assert likelihood.bits_per_dim_offset(8, 1.0) == 8.0      # data in [0, 1]
  assert likelihood.bits_per_dim_offset(8, 2.0) == 7.0      # data centered to [-1, 1]
  with pytest.raises(ValueError, match='scaler_slope'):
    likelihood.bits_per_dim_offset(8, 0.0)


def test_dequantized_image_bits_per_dim(x64):
  """Uniform data on [0, 1)^D has log-density 0, so its dequantized bits/dim is exactly 8.

  A Gaussian of huge variance centred in the cube is nearly flat there: its
  bits/dim must come out as 8 + its (tiny) negative log-density per dimension,
  with the offset 7 when the same data are centered to [-1, 1].
  """
  images = jax.random.randint(jax.random.PRNGKey(0), (4, 2, 2, 3), 0, 256)
  y = likelihood.uniform_dequantize(jax.random.PRNGKey(1), images)
  assert float(y.min()) >= 0.0 and float(y.max()) < 1.0
  np.testing.assert_array_equal(jnp.floor(y * 256), images)
  sde = make_sde('vpsde')
  var0 = 1e4
  # Score of N(0.5 a, a^2 var0 + std^2) under the VP SDE: the data are N(0.5, var0).
  def score_fn(x, t):
    a, std = sde.marginal_coeffs(t)
    a, std = a[:, None, None, None], std[:, None, None, None]
    return -(x - 0.5 * a) / (a**2 * var0 + std**2)
  def prior_logp(z):   # the exact p_T of these data
    a, std = sde.marginal_coeffs(jnp.ones(z.shape[:1]))
    var = (a**2 * var0 + std**2)[:, None, None, None]
    logn = -0.5 * jnp.log(2 * jnp.pi * var) - (z - 0.5 * a[:, None, None, None])**2 / (2 * var)
    return logn.reshape(z.shape[0], -1).sum(-1)

  for slope, shift, offset in ((1.0, 0.0, 8.0), (2.0, -1.0, 7.0)):
    fn = likelihood.get_likelihood_fn(sde, hutchinson_type='exact', eps=EPS, rtol=1e-8,
                                      atol=1e-8, num_bits=8, scaler_slope=slope,
                                      prior_logp=prior_logp)
    result = fn(jax.random.PRNGKey(0), score_fn, slope * y + shift)
    d = 12
    np.testing.assert_allclose(result.bpd, -result.logp / (d * math.log(2)) + offset, rtol=1e-10)
    if slope == 1.0:
      # Gaussian density of N(0.5, var0) per dim at y, in bits, plus 8: close to 8 + 0.5 log2(2 pi var0).
      expected = 8 + 0.5 * math.log2(2 * math.pi * var0) + np.asarray(
          ((y - 0.5)**2).reshape(4, -1).sum(-1) / (2 * var0 * d * math.log(2)))
      np.testing.assert_allclose(result.bpd, expected, atol=1e-3)


def test_invalid_arguments():
  sde = make_sde('vpsde')
  with pytest.raises(ValueError, match=r"hutchinson_type 'exactly'.*rademacher"):
    likelihood.get_likelihood_fn(sde, hutchinson_type='exactly')
  with pytest.raises(ValueError, match='solver'):
    likelihood.get_likelihood_fn(sde, solver='euler')
  with pytest.raises(ValueError, match=r"error_norm 'max'.*per_example"):
    likelihood.get_likelihood_fn(sde, error_norm='max')
