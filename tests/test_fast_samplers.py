"""Few-step ODE samplers: their grids, their convergence order on a Gaussian (float64, exact
probability-flow solution), and their samples of the 2-D mixture against PC at 2000 NFE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval_lib
import fast_samplers
import sampling
from conftest import SDE_NAMES, make_sde, mixture_statistics

EPS = {'vesde': 1e-5, 'vpsde': 1e-3, 'subvpsde': 1e-3}   # configs' sampling.eps

# -----------------------------------------------------------------------------
# Grids.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize('name', SDE_NAMES)
@pytest.mark.parametrize('grid', sorted(fast_samplers.GRIDS))
def test_grids_fall_strictly_from_T_to_eps(name, grid):
  sde = make_sde(name)
  times = np.asarray(fast_samplers.make_grid(sde, grid, 12, EPS[name]))
  assert times.shape == (13,)
  assert times[0] == np.float32(sde.T) and times[-1] == np.float32(EPS[name])
  assert np.all(np.diff(times) < 0)


@pytest.mark.parametrize('name', SDE_NAMES)
def test_log_snr_and_karras_grids_are_what_they_say(name, x64):
  sde = make_sde(name)
  eps = EPS[name]
  lam = np.asarray(sde.log_snr(fast_samplers.log_snr_grid(sde, 10, eps)))
  np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / 10, rtol=1e-9)
  sigma = np.exp(-np.asarray(sde.log_snr(fast_samplers.karras_grid(sde, 10, eps))))
  smax, smin = sigma[0], sigma[-1]
  want = (smax**(1 / 7) + np.arange(11) / 10 * (smin**(1 / 7) - smax**(1 / 7)))**7
  np.testing.assert_allclose(sigma, want, rtol=1e-9)
  quad = np.asarray(fast_samplers.quadratic_grid(sde, 10, eps))
  np.testing.assert_allclose(np.sqrt((quad - eps) / (1 - eps)), np.linspace(1, 0, 11), atol=1e-12)


def test_bad_grids_are_refused_with_the_reason():
  sde = make_sde('vpsde')
  with pytest.raises(ValueError, match="Unknown time grid 'cosine'.*karras"):
    fast_samplers.make_grid(sde, 'cosine', 10, 1e-3)
  with pytest.raises(ValueError, match='steps must be a positive integer, got 0'):
    fast_samplers.make_grid(sde, 'uniform', 0, 1e-3)
  with pytest.raises(ValueError, match=r'eps must lie in \(0, T'):
    fast_samplers.make_grid(sde, 'uniform', 10, 0.0)
  with pytest.raises(ValueError, match='decrease strictly'):   # a step of zero size
    fast_samplers.make_grid(sde, [1.0, 0.5, 0.5, 0.1], None, None)
  with pytest.raises(ValueError, match='decrease strictly'):   # ends at t = 0 (std = 0)
    fast_samplers.make_grid(sde, [1.0, 0.5, 0.0], None, None)
  with pytest.raises(ValueError, match='at least 2 times'):
    fast_samplers.make_grid(sde, [1.0], None, None)


# -----------------------------------------------------------------------------
# Convergence order on a Gaussian: the probability-flow ODE maps x_T to
# a_t mu + sqrt(a_t^2 s^2 + std_t^2) xi, xi = (x_T - a_T mu) / sqrt(a_T^2 s^2 + std_T^2).
# -----------------------------------------------------------------------------

MU = np.array([0.5, -1.0])
S2 = np.array([0.3, 0.05])


def _gaussian_score(sde):
  def score_fn(x, t):
    a, std = sde.marginal_coeffs(t)
    a, std = a[:, None], std[:, None]
    return -(x - a * MU[None]) / (a**2 * S2[None] + std**2)
  return score_fn


def _exact_endpoint(sde, x_T, t_end):
  a0, s0 = sde.marginal_coeffs(jnp.asarray(sde.T))
  a1, s1 = sde.marginal_coeffs(jnp.asarray(t_end))
  xi = (x_T - a0 * MU[None]) / jnp.sqrt(a0**2 * S2[None] + s0**2)
  return a1 * MU[None] + jnp.sqrt(a1**2 * S2[None] + s1**2) * xi


# (sampler, options, order). The grid is EDM's (uneven in lambda): on a grid uniform in
# lambda, 3M's error falls as M^-4 on this problem (measured), which would hide its order.
# UniPC with predictor order p is of order p + 1 (its corrector).
ORDERS = [('ddim', {}, 1), ('heun', {}, 2), ('dpm_solver_2m', {}, 2), ('dpm_solver_2s', {}, 2),
          ('dpm_solver_3m', {}, 3), ('unipc', {'order': 1}, 2), ('unipc', {'order': 2}, 3),
          ('unipc', {'order': 3}, 4), ('unipc', {'order': 2, 'variant': 'bh1'}, 3)]


@pytest.mark.slow
@pytest.mark.parametrize('name', SDE_NAMES)
def test_endpoint_error_falls_at_each_methods_order(name, x64):
  sde = make_sde(name)
  key = jax.random.PRNGKey(0)
  x_T = sde.prior_sampling(key, (64, 2))
  want = _exact_endpoint(sde, x_T, EPS[name])
  slopes = {}
  for sampler, options, order in ORDERS:
    errors = []
    for steps in (40, 80):
      if sampler in ('dpm_solver_2m', 'dpm_solver_3m', 'unipc'):
        options = dict(options, lower_order_final=False)
      x, _ = sampling.get_sampler(sampler, sde, (64, 2), steps=steps, eps=EPS[name], grid='karras',
                                  denoise=False, **options)(key, _gaussian_score(sde))
      errors.append(float(jnp.max(jnp.abs(x - want))))
    label = f'{sampler}{options.get("order", "")}{options.get("variant", "")}'
    slopes[label] = (np.log2(errors[0] / errors[1]), order)
  # Measured slopes from 40 to 80 steps lie within 0.1 of the order (VE, VP, sub-VP).
  for label, (slope, order) in slopes.items():
    assert abs(slope - order) < 0.2, (label, slopes)


def test_ddim_with_eta_one_is_the_ancestral_step(x64):
  """eta = 1: x_s = a_s x0 + sqrt(std_s^2 - var) eps + sqrt(var) z is the posterior
  q(x_s | x_t, x0) that SDE.ancestral_step samples (sub-VP: the generic rule)."""
  sde = make_sde('subvpsde', N=50)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  t = 0.6
  s = t - sde.T / sde.N
  score_fn = _gaussian_score(sde)
  key = jax.random.PRNGKey(2)
  got = fast_samplers.ddim(sde, score_fn, key, x, jnp.array([t, s]), eta=1.0, denoise=False)
  t_vec = jnp.full((16,), t)
  mean, std = sde.ancestral_step(x, t_vec, score_fn(x, t_vec))
  z = jax.random.normal(jax.random.split(key, 1)[0], x.shape, x.dtype)
  np.testing.assert_allclose(got, mean + std[:, None] * z, rtol=1e-10, atol=1e-12)


def test_lower_order_final_steps():
  orders = np.asarray(fast_samplers._per_step_order(3, 6, True))
  np.testing.assert_array_equal(orders, [1, 2, 3, 3, 2, 1])
  np.testing.assert_array_equal(fast_samplers._per_step_order(3, 6, False), [1, 2, 3, 3, 3, 3])
  np.testing.assert_array_equal(fast_samplers._per_step_order(2, 20, True), [1] + [2] * 19)


# -----------------------------------------------------------------------------
# The 2-D mixture with its exact score: 20 evaluations against PC's 2000.
# -----------------------------------------------------------------------------

N = 2000


@pytest.fixture(scope='module')
def reference_sets(mixture):
  """A true sample set, and the energy distances of 12 independent true sets to it."""
  true = mixture.sample(jax.random.PRNGKey(100), N)
  floor = [float(eval_lib.energy_distance(mixture.sample(jax.random.PRNGKey(200 + i), N), true))
           for i in range(12)]
  return true, np.array(floor)


# DPM-Solver++ and UniPC at <= 20 NFE (19 steps and the final denoise; 2S: 9 steps of 2, 19).
FAST_AT_20 = [('dpm_solver_2m', 19), ('dpm_solver_3m', 19), ('unipc', 19), ('dpm_solver_2s', 9)]


@pytest.mark.slow
@pytest.mark.parametrize('name', SDE_NAMES)
def test_twenty_evaluations_match_the_mixture_as_well_as_pc_at_2000(mixture, reference_sets, name):
  """Energy distance to a true set of the same size and the mode weights, for PC
  (reverse diffusion + Langevin, N = 1000: 2000 NFE) and for each solver at 20 NFE, against
  one bound: the mean + 2 sd of the energy distance between independent true sets (measured
  here: 0.0028 + 2 x 0.0012), and 3 binomial standard errors on each mode weight (0.034)."""
  true, floor = reference_sets
  ed_bound = floor.mean() + 2 * floor.std()
  w_bound = 3 * np.sqrt(0.25 / N)
  sde = make_sde(name, N=1000)
  runs = [('pc', {})] + [(s, dict(steps=k)) for s, k in FAST_AT_20]
  results = {}
  for sampler, options in runs:
    x, nfe = sampling.get_sampler(sampler, sde, (N, 2), eps=EPS[name], **options)(
        jax.random.PRNGKey(7), mixture.score_fn(sde))
    assert nfe == 2000 if sampler == 'pc' else nfe <= 20
    weights, _, _ = mixture_statistics(mixture, x)
    results[sampler] = (float(eval_lib.energy_distance(x, true)),
                        float(np.abs(weights - np.asarray(mixture.weights)).max()))
  for sampler, (ed, w_err) in results.items():
    assert ed < ed_bound and w_err < w_bound, (sampler, results, ed_bound, w_bound)


@pytest.mark.parametrize('sampler,options', [('ddim', dict(eta=1.0, steps=200)),
                                             ('heun', dict(churn=10.0, steps=100))])
def test_stochastic_variants_sample_the_mixture(mixture, reference_sets, sampler, options):
  """DDIM with eta = 1 (ancestral) and EDM's Algorithm 2 (churn): stochastic, more steps."""
  true, floor = reference_sets
  sde = make_sde('vpsde')
  x, _ = sampling.get_sampler(sampler, sde, (N, 2), **options)(
      jax.random.PRNGKey(3), mixture.score_fn(sde))
  weights, _, _ = mixture_statistics(mixture, x)
  assert float(eval_lib.energy_distance(x, true)) < floor.mean() + 2 * floor.std()
  assert np.abs(weights - np.asarray(mixture.weights)).max() < 3 * np.sqrt(0.25 / N)


@pytest.mark.parametrize('name', SDE_NAMES)
def test_churn_never_asks_the_score_past_T(mixture, name):
  """EDM's churn raises a level by (1 + gamma); at the first level that would be a time past
  T, where a network was never trained (a discrete VE label would wrap around): capped."""
  sde = make_sde(name)
  exact = mixture.score_fn(sde)

  def guarded(x, t):      # NaN for any evaluation past T
    return jnp.where((t <= sde.T)[:, None], exact(x, t), jnp.nan)

  x, _ = sampling.get_sampler('heun', sde, (256, 2), steps=10, churn=40.0, eps=EPS[name])(
      jax.random.PRNGKey(0), guarded)
  assert np.all(np.isfinite(np.asarray(x)))


def test_fast_sampler_requests_that_cannot_be_honoured_are_refused():
  sde = make_sde('vesde')
  with pytest.raises(ValueError, match=r"sampler 'dpm_solver_2m' fixes \['order'\]"):
    sampling.get_sampler('dpm_solver_2m', sde, (4, 2), order=3)
  with pytest.raises(ValueError, match='the grid must begin there, got 0.5'):
    sampling.get_sampler('ddim', sde, (4, 2), grid=[0.5, 0.1, 0.01])
