"""SDE coefficients against Monte Carlo, scipy and the SMLD/DDPM formulas."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import sde_lib
from conftest import SDE_NAMES, make_sde


def _simulate_forward(sde, key, x0, t_end, n_steps):
  """Fine-step Euler–Maruyama simulation of the forward SDE from 0 to t_end."""
  dt = t_end / n_steps

  def body(x, inputs):
    i, key = inputs
    t = jnp.full(x.shape[:1], i * dt)
    drift, diffusion = sde.sde(x, t)
    z = jax.random.normal(key, x.shape)
    return x + drift * dt + diffusion[:, None] * jnp.sqrt(dt) * z, None

  x, _ = jax.lax.scan(body, x0, (jnp.arange(n_steps), jax.random.split(key, n_steps)))
  return x


@pytest.mark.optimized
@pytest.mark.parametrize('name', SDE_NAMES)
@pytest.mark.parametrize('t_end', [0.3, 1.0])
def test_marginal_prob_matches_monte_carlo(name, t_end):
  sde = make_sde(name)
  n = 40_000
  x0_point = jnp.array([1.5, -0.5])
  x0 = jnp.broadcast_to(x0_point, (n, 2))
  if name == 'vesde':
    # VE's convention: data at t = 0 already carry sigma_min noise (std(0) = sigma_min).
    x0 = x0 + sde.sigma_min * jax.random.normal(jax.random.PRNGKey(7), x0.shape)
  x = np.asarray(_simulate_forward(sde, jax.random.PRNGKey(0), x0, t_end, 2000), np.float64)
  mean, std = sde.marginal_prob(x0_point[None], jnp.array([t_end]))
  mean, var = np.asarray(mean[0]), float(std[0])**2
  # Statistical bounds: 5 standard errors (Monte Carlo) plus 1% for the Euler–Maruyama bias.
  mean_se = np.sqrt(var / n)
  np.testing.assert_allclose(x.mean(0), mean, atol=5 * mean_se + 0.01 * np.abs(mean).max())
  var_se = var * np.sqrt(2.0 / n)
  np.testing.assert_allclose(x.var(0), var, atol=5 * var_se + 0.01 * var)


@pytest.mark.parametrize('name', SDE_NAMES)
def test_prior_logp_matches_scipy(name):
  sde = make_sde(name)
  z = sde.prior_sampling(jax.random.PRNGKey(1), (16, 3, 4, 2))
  assert z.shape == (16, 3, 4, 2)
  expected = scipy.stats.norm.logpdf(np.asarray(z, np.float64), scale=sde.prior_std).reshape(16, -1).sum(-1)
  np.testing.assert_allclose(sde.prior_logp(z), expected, rtol=1e-5)


def test_prior_scales():
  assert make_sde('vesde').prior_std == 50.0
  assert make_sde('vpsde').prior_std == 1.0
  assert make_sde('subvpsde').prior_std == 1.0
  z = make_sde('vesde').prior_sampling(jax.random.PRNGKey(0), (20_000, 1))
  np.testing.assert_allclose(float(jnp.std(z)), 50.0, rtol=0.02)


def test_ve_discretize_is_smld():
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=10)
  sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 10))
  x = jnp.ones((10, 3))
  t = jnp.arange(10) / 9.0 + 1e-6   # exactly the level times t_i = i / (N - 1)
  f, G = sde.discretize(x, t)
  np.testing.assert_array_equal(f, 0.0)
  prev = np.concatenate([[0.0], sigmas[:-1]])
  np.testing.assert_allclose(G, np.sqrt(sigmas**2 - prev**2), rtol=1e-5)


def test_vp_discretize_is_ddpm():
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=40)
  betas = np.linspace(0.1 / 40, 20.0 / 40, 40)
  x = jax.random.normal(jax.random.PRNGKey(0), (40, 2, 2))
  t = jnp.arange(40) / 39.0 + 1e-6
  f, G = sde.discretize(x, t)
  np.testing.assert_allclose(f, (np.sqrt(1 - betas)[:, None, None] - 1) * np.asarray(x), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(G, np.sqrt(betas), rtol=1e-6)
  np.testing.assert_allclose(sde.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)


def test_subvp_discretize_is_euler_maruyama():
  sde = sde_lib.subVPSDE(N=50)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  t = jnp.array([0.01, 0.2, 0.5, 1.0])
  f, G = sde.discretize(x, t)
  drift, diffusion = sde.sde(x, t)
  np.testing.assert_allclose(f, drift / 50, rtol=1e-6)
  np.testing.assert_allclose(G, diffusion * np.sqrt(1 / 50), rtol=1e-6)


def test_beta_is_derivative_of_its_integral():
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0)
  t = jnp.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(sde.beta(t), 0.1 + t * 19.9, rtol=1e-6)


@pytest.mark.parametrize('name', SDE_NAMES)
def test_coefficient_closed_forms(name):
  """Drift, diffusion and marginals against REFERENCE.md's table, written independently."""
  sde = make_sde(name)
  t = np.array([1e-4, 0.1, 0.5, 1.0])
  x = np.ones((4, 2))
  drift, g = sde.sde(jnp.asarray(x), jnp.asarray(t))
  mean, std = sde.marginal_prob(jnp.asarray(x), jnp.asarray(t))
  if name == 'vesde':
    sigma = 0.01 * 5000.0**t
    exp_drift, exp_g = 0 * x, sigma * np.sqrt(2 * np.log(5000.0))
    exp_mean, exp_std = x, sigma
  else:
    beta = 0.1 + t * 19.9
    m = -t**2 * 19.9 / 4 - t * 0.1 / 2
    exp_drift, exp_mean = -beta[:, None] * x / 2, np.exp(m)[:, None] * x
    if name == 'vpsde':
      exp_g, exp_std = np.sqrt(beta), np.sqrt(1 - np.exp(2 * m))
    else:
      exp_g = np.sqrt(beta * (1 - np.exp(-2 * 0.1 * t - 19.9 * t**2)))
      exp_std = 1 - np.exp(2 * m)
  np.testing.assert_allclose(drift, exp_drift, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g, exp_g, rtol=1e-4)
  np.testing.assert_allclose(mean, exp_mean, rtol=1e-5)
  np.testing.assert_allclose(std, exp_std, rtol=1e-4)


@pytest.mark.parametrize('name', SDE_NAMES)
@pytest.mark.parametrize('probability_flow', [False, True])
def test_reverse(name, probability_flow):
  sde = make_sde(name, N=100)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 3))
  t = jnp.linspace(0.1, 0.9, 5)
  score_fn = lambda x, t: -x * (1 + t[:, None, None])
  rev = sde.reverse(score_fn, probability_flow)
  drift, g = rev.sde(x, t)
  f, g_fwd = sde.sde(x, t)
  w = 0.5 if probability_flow else 1.0
  np.testing.assert_allclose(drift, f - w * g_fwd[:, None, None]**2 * score_fn(x, t), rtol=1e-5, atol=1e-6)
  rf, rG = rev.discretize(x, t)
  ff, fG = sde.discretize(x, t)
  np.testing.assert_allclose(rf, ff - w * fG[:, None, None]**2 * score_fn(x, t), rtol=1e-5, atol=1e-6)
  if probability_flow:
    np.testing.assert_array_equal(g, 0.0)
    np.testing.assert_array_equal(rG, 0.0)
  else:
    np.testing.assert_allclose(g, g_fwd)
    np.testing.assert_allclose(rG, fG)


def test_generic_ancestral_step_recovers_smld_rule():
  """The Gaussian-posterior ancestral rule, applied to VE marginals, gives SMLD's eq. 47."""
  sde = sde_lib.VESDE(N=100)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 2))
  score = jax.random.normal(jax.random.PRNGKey(1), (6, 2))
  t = jnp.linspace(0.2, 0.9, 6)
  x_mean, std = sde_lib.SDE.ancestral_step(sde, x, t, score)
  sigma, prev = sde.sigma(t), sde.sigma(t - 1 / 100)
  np.testing.assert_allclose(x_mean, x + (sigma**2 - prev**2)[:, None] * score, rtol=1e-4)
  np.testing.assert_allclose(std, np.sqrt(prev**2 * (sigma**2 - prev**2) / sigma**2), rtol=1e-4)


def test_sdes_are_frozen_pytrees():
  sde = sde_lib.VPSDE(beta_min=0.2, beta_max=10.0, N=50)
  assert jax.tree.leaves(sde) == [0.2, 10.0]   # N is static
  with pytest.raises(dataclasses.FrozenInstanceError):
    sde.N = 3
  std = jax.jit(lambda s, t: s.marginal_prob(jnp.ones((1, 1)), t)[1])(sde, jnp.array([1.0]))
  np.testing.assert_allclose(std, np.sqrt(1 - np.exp(-(0.2 + 0.5 * 9.8))), rtol=1e-5)


def test_unknown_sde_names_the_valid_ones():
  with pytest.raises(ValueError, match='subvpsde'):
    sde_lib.get_sde('vp')


def test_geometric_levels_and_their_two_orders():
  """One geometric sequence: VESDE.discrete_sigmas ascending, descending_sigmas its reverse."""
  levels = sde_lib.geometric_noise_levels(0.01, 50.0, 7)
  np.testing.assert_allclose(levels, np.geomspace(0.01, 50.0, 7), rtol=1e-6)
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=7)
  np.testing.assert_array_equal(sde.discrete_sigmas, levels)
  np.testing.assert_array_equal(sde.descending_sigmas, np.asarray(levels)[::-1])


def test_level_index_truncates_and_ve_label_rounds():
  """discrete_index truncates t (N - 1) / T (the reference's labels.long()); the VE label rounds
  (T - t)(N - 1) (its torch.round). Off the grid the two rules name different levels; on the
  sampling grid and at discrete_time(i) the label is N - 1 - index, the same level."""
  sde = sde_lib.VESDE(N=10)
  t = jnp.array([0.0, 0.3, 0.5, 0.75, 1.0])          # t (N - 1) = 0, 2.7, 4.5, 6.75, 9
  np.testing.assert_array_equal(sde.discrete_index(t), [0, 2, 4, 6, 9])
  np.testing.assert_array_equal(sde.discrete_label(t), [9, 6, 4, 2, 0])   # round(6.3), round(4.5)...
  vp = sde_lib.VPSDE(N=10)
  np.testing.assert_allclose(vp.discrete_label(t), 9 * np.asarray(t), rtol=1e-6)   # not rounded
  for n in (10, 1000):
    sde = sde_lib.VESDE(N=n)
    grid = jnp.concatenate([jnp.linspace(1.0, 1e-5, n), sde.discrete_time(jnp.arange(n))])
    np.testing.assert_array_equal(n - 1 - sde.discrete_label(grid), sde.discrete_index(grid))


def test_discrete_marginal_coeffs_are_the_levels():
  t = jnp.array([0.05, 0.5, 1.0])
  ve = sde_lib.VESDE(N=10)
  a, std = ve.discrete_marginal_coeffs(t)
  np.testing.assert_array_equal(a, 1.0)
  np.testing.assert_allclose(std, np.geomspace(0.01, 50.0, 10)[[0, 4, 9]], rtol=1e-5)
  vp = sde_lib.VPSDE(N=50)                             # levels int(t 49) = 2, 24, 49
  abar = np.cumprod(1 - np.linspace(0.1 / 50, 20.0 / 50, 50))[[2, 24, 49]]
  a, std = vp.discrete_marginal_coeffs(t)
  np.testing.assert_allclose(a, np.sqrt(abar), rtol=1e-5)
  np.testing.assert_allclose(std, np.sqrt(1 - abar), rtol=1e-5)


@pytest.mark.parametrize('name', SDE_NAMES)
def test_probability_flow_drift(name):
  """(t scalar, x) -> f - g^2 s / 2 (eq. 13), the vector field the ODE solvers integrate."""
  sde = make_sde(name)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 3))
  score_fn = lambda x, t: -x * (1 + t[:, None, None])
  t = 0.3
  f, g = sde.sde(x, jnp.full((4,), t))
  want = f - 0.5 * g[:, None, None]**2 * score_fn(x, jnp.full((4,), t))
  np.testing.assert_allclose(sde.probability_flow_drift(score_fn)(t, x), want, rtol=1e-6, atol=1e-6)


def test_sum_except_batch_and_as_pytree():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  np.testing.assert_array_equal(sde_lib.sum_except_batch(x), [66.0, 210.0])
  fn = lambda x, t: x
  wrapped = sde_lib.as_pytree(fn)
  assert isinstance(wrapped, jax.tree_util.Partial) and jax.tree.leaves(wrapped) == []
  bound = jax.tree_util.Partial(lambda p, x, t: p * x, jnp.ones(()))
  assert sde_lib.as_pytree(bound) is bound


def test_per_example_norm_and_its_gradient_at_zero():
  x = jnp.array([[[3.0, 4.0]], [[0.0, 0.0]]])
  np.testing.assert_allclose(sde_lib.per_example_norm(x), [5.0, 0.0])
  grad = jax.grad(lambda x: jnp.sum(sde_lib.per_example_norm(x)))(x)
  np.testing.assert_allclose(grad[0], [[0.6, 0.8]], rtol=1e-6)   # x / ||x||
  np.testing.assert_array_equal(grad[1], [[0.0, 0.0]])            # 0, not NaN, at x = 0


@pytest.mark.parametrize('name', SDE_NAMES)
def test_time_at_log_snr_inverts_log_snr(name, x64):
  """The closed-form inverses (VE: log sigma; VP: softplus; sub-VP: asinh) over [1e-5, T]."""
  sde = make_sde(name)
  t = jnp.concatenate([jnp.geomspace(1e-5, 1e-2, 20), jnp.linspace(2e-2, 1.0, 50)])
  lam = sde.log_snr(t)
  assert bool(jnp.all(jnp.diff(lam) < 0))
  np.testing.assert_allclose(sde.time_at_log_snr(lam), t, rtol=1e-9)
  a, std = sde.marginal_coeffs(t)
  np.testing.assert_allclose(lam, np.log(np.asarray(a) / np.asarray(std)), rtol=1e-12)
