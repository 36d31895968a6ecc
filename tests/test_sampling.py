"""Samplers reproduce a 2-D Gaussian mixture from its exact perturbed score."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussian_mixture
import likelihood
import sampling
from conftest import SDE_NAMES, assert_matches_mixture, make_sde

N_SAMPLES = 4000
# Bounds for 4000 samples: a mode weight's standard error is at most 0.008; the
# rest covers the discretization error of N = 500 steps.
WEIGHT_TOL, MEAN_TOL, COV_TOL = 0.04, 0.06, 0.06

# Corrector-only sampling must transport the prior by itself: more, larger steps.
CORRECTOR_ONLY = {'langevin': dict(snr=0.3, n_steps=2), 'ald': dict(snr=0.5, n_steps=4)}
PAIRS = [(p, c) for p in sampling.PREDICTORS for c in sampling.CORRECTORS
         if (p, c) != ('none', 'none')]


@pytest.mark.optimized
@pytest.mark.parametrize('name', SDE_NAMES)
@pytest.mark.parametrize('predictor,corrector', PAIRS)
def test_pc_sampler_reproduces_mixture(mixture, name, predictor, corrector):
  sde = make_sde(name, N=500)
  kwargs = CORRECTOR_ONLY[corrector] if predictor == 'none' else dict(snr=0.16, n_steps=1)
  mean_tol = MEAN_TOL
  if (name, predictor, corrector) == ('subvpsde', 'none', 'ald'):
    # ALD's step (snr std_t)^2 shrinks like t^2 for sub-VP (std = 1 - e^-B, not its
    # square root), so ALD alone tracks the sharpening marginal slowly: more steps,
    # and a looser bound on the means.
    kwargs, mean_tol = dict(snr=0.5, n_steps=8), 0.08
  sampler = sampling.get_pc_sampler(sde, (N_SAMPLES, 2), predictor, corrector, **kwargs)
  x, nfe = sampler(jax.random.PRNGKey(0), mixture.score_fn(sde))
  assert x.shape == (N_SAMPLES, 2)
  p_nfe = 0 if predictor == 'none' else 1
  c_nfe = 0 if corrector == 'none' else kwargs['n_steps']
  assert nfe == 500 * (p_nfe + c_nfe)
  assert_matches_mixture(mixture, x, WEIGHT_TOL, mean_tol, COV_TOL)


def test_none_none_returns_the_prior(mixture):
  sde = make_sde('vpsde', N=20)
  sampler = sampling.get_pc_sampler(sde, (8, 2), 'none', 'none')
  x, nfe = sampler(jax.random.PRNGKey(0), mixture.score_fn(sde))
  key, k_prior = jax.random.split(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(x, sde.prior_sampling(k_prior, (8, 2)))
  assert nfe == 0


@pytest.mark.parametrize('name', SDE_NAMES)
def test_probability_flow_pc_sampler(mixture, name):
  sde = make_sde(name, N=500)
  sampler = sampling.get_pc_sampler(sde, (N_SAMPLES, 2), 'reverse_diffusion', 'none',
                                    probability_flow=True)
  x, _ = sampler(jax.random.PRNGKey(1), mixture.score_fn(sde))
  assert_matches_mixture(mixture, x, WEIGHT_TOL, MEAN_TOL, COV_TOL)


@pytest.mark.parametrize('name', SDE_NAMES)
def test_ode_sampler_reproduces_mixture(mixture, name):
  sde = make_sde(name)
  sampler = sampling.get_ode_sampler(sde, (N_SAMPLES, 2), rtol=1e-5, atol=1e-5)
  x, nfe = sampler(jax.random.PRNGKey(2), mixture.score_fn(sde))
  assert 20 < int(nfe) < 1000
  assert_matches_mixture(mixture, x, WEIGHT_TOL, 0.04, 0.04)


def test_ode_sampler_decodes_a_given_latent(mixture):
  sde = make_sde('vpsde')
  z = sde.prior_sampling(jax.random.PRNGKey(3), (64, 2))
  sampler = sampling.get_ode_sampler(sde, (64, 2), rtol=1e-6, atol=1e-6, eps=1e-5)
  x1, _ = sampler(jax.random.PRNGKey(4), mixture.score_fn(sde), z=z)
  x2, _ = sampler(jax.random.PRNGKey(5), mixture.score_fn(sde), z=z)
  np.testing.assert_array_equal(x1, x2)   # deterministic given z: the key is unused
  x3, _ = likelihood.decode(sde, mixture.score_fn(sde), z, rtol=1e-6, atol=1e-6, eps=1e-5)
  np.testing.assert_allclose(x1, x3, atol=1e-5)
  with pytest.raises(ValueError, match=r'latent z has shape \(3, 2\)'):
    sampler(jax.random.PRNGKey(4), mixture.score_fn(sde), z=z[:3])


def test_ode_sampler_denoise_adds_one_evaluation(mixture):
  sde = make_sde('vpsde')
  score_fn = mixture.score_fn(sde)
  _, nfe = sampling.get_ode_sampler(sde, (16, 2))(jax.random.PRNGKey(0), score_fn)
  _, nfe_d = sampling.get_ode_sampler(sde, (16, 2), denoise=True)(jax.random.PRNGKey(0), score_fn)
  assert int(nfe_d) == int(nfe) + 1


class _CallCounter:
  """Counts the score evaluations a compiled sampler really makes, at run time."""

  def __init__(self, score_fn):
    self.count = 0
    self._score_fn = score_fn

  def _tick(self):
    self.count += 1

  def __call__(self, x, t):
    jax.debug.callback(self._tick)
    return self._score_fn(x, t)


@pytest.mark.parametrize('predictor,corrector,n_steps', [
    ('reverse_diffusion', 'langevin', 2), ('none', 'ald', 3), ('euler_maruyama', 'none', 1),
    ('ancestral_sampling', 'ald', 1)])
def test_pc_nfe_counts_real_evaluations(mixture, predictor, corrector, n_steps):
  sde = make_sde('vpsde', N=21)   # VP's discrete chain needs N > beta_max = 20
  counter = _CallCounter(mixture.score_fn(sde))
  sampler = sampling.get_pc_sampler(sde, (8, 2), predictor, corrector, n_steps=n_steps)
  x, nfe = sampler(jax.random.PRNGKey(0), counter)
  jax.block_until_ready(x)
  jax.effects_barrier()
  assert counter.count == nfe


@pytest.mark.parametrize('denoise', [False, True])
def test_ode_nfe_counts_real_evaluations(mixture, denoise):
  sde = make_sde('vesde')
  counter = _CallCounter(mixture.score_fn(sde))
  sampler = sampling.get_ode_sampler(sde, (8, 2), rtol=1e-4, atol=1e-4, denoise=denoise)
  x, nfe = sampler(jax.random.PRNGKey(0), counter)
  jax.block_until_ready(x)
  jax.effects_barrier()
  assert counter.count == int(nfe)


def test_new_parameters_do_not_recompile():
  sde = make_sde('vpsde', N=20)   # the Langevin corrector's alpha_i = 1 - beta_i needs N >= 20
  traces = []

  def score(params, x, t):
    traces.append(1)   # runs only while tracing
    return -(x - params['mu'][None]) / params['var']

  sampler = sampling.get_pc_sampler(sde, (4, 2), 'euler_maruyama', 'langevin')
  ode = sampling.get_ode_sampler(sde, (4, 2))
  make_params = lambda mu, var: {'mu': jnp.full((2,), mu, jnp.float32),
                                  'var': jnp.full((), var, jnp.float32)}
  for mu in (0.0, 1.0, 2.0):
    params = make_params(mu, 1.0)
    x, _ = sampler(jax.random.PRNGKey(0), jax.tree_util.Partial(score, params))
    ode(jax.random.PRNGKey(0), jax.tree_util.Partial(score, params))
  n_after_first = len(traces)
  params = make_params(5.0, 2.0)
  sampler(jax.random.PRNGKey(0), jax.tree_util.Partial(score, params))
  ode(jax.random.PRNGKey(0), jax.tree_util.Partial(score, params))
  assert len(traces) == n_after_first


def test_unknown_names_list_the_valid_ones():
  sde = make_sde('vpsde')
  with pytest.raises(ValueError, match=r"predictor 'heun'.*reverse_diffusion"):
    sampling.get_pc_sampler(sde, (1, 2), 'heun', 'none')
  with pytest.raises(ValueError, match=r"corrector 'hmc'.*langevin"):
    sampling.get_pc_sampler(sde, (1, 2), 'none', 'hmc')
  with pytest.raises(ValueError, match=r"ODE solver 'rk4'.*tsit5"):
    sampling.get_ode_sampler(sde, (1, 2), solver='rk4')


@pytest.mark.parametrize('name, steps, predictor, corrector, message', [
    ('vpsde', 10, 'reverse_diffusion', 'none', 'needs beta_max / N <= 1, here 20 / 10'),
    ('vpsde', 19, 'euler_maruyama', 'langevin', 'needs beta_max / N <= 1, here 20 / 19'),
    ('vpsde', 20, 'ancestral_sampling', 'none', 'needs beta_max / N < 1, here 20 / 20'),
    ('subvpsde', 10, 'none', 'ald', 'needs beta_max / N <= 1, here 20 / 10'),
])
def test_discrete_chain_with_too_few_steps_is_refused_not_nan(mixture, name, steps, predictor,
                                                             corrector, message):
  """With N < beta_max the DDPM chain's 1 - beta_i goes negative (at N = beta_max ancestral
  sampling divides by sqrt(0)): samples were NaN. Now a ValueError says which N works; one
  step more (or a sampler without the chain) samples finite values."""
  sde = make_sde(name)
  score_fn = mixture.score_fn(sde)
  get = lambda n, p, c: sampling.get_sampler('pc', sde, (200, 2), steps=n, predictor=p,
                                             corrector=c)(jax.random.PRNGKey(0), score_fn)[0]
  with pytest.raises(ValueError, match=re.escape(message)):
    get(steps, predictor, corrector)
  assert np.all(np.isfinite(np.asarray(get(steps + 1 if predictor == 'ancestral_sampling' else 20,
                                           predictor, corrector))))
  assert np.all(np.isfinite(np.asarray(get(steps, 'euler_maruyama', 'none'))))


def test_ancestral_has_no_probability_flow(mixture):
  sde = make_sde('vpsde', N=10)
  sampler = sampling.get_pc_sampler(sde, (2, 2), 'ancestral_sampling', 'none', probability_flow=True)
  with pytest.raises(ValueError, match='no probability-flow form'):
    sampler(jax.random.PRNGKey(0), mixture.score_fn(sde))


def test_langevin_dynamics_samples_a_gaussian():
  """The seed's naive Langevin method on a time-independent score: a correlated Gaussian."""
  g = gaussian_mixture.GaussianMixture.from_covs([1.0], [[1.0, -2.0]], [[[1.0, 0.6], [0.6, 0.8]]])
  score_fn = lambda x, t: g.score_at(x, jnp.ones_like(t), jnp.zeros_like(t))
  x0 = jnp.zeros((N_SAMPLES, 2))
  x, nfe = sampling.langevin_dynamics(score_fn, jax.random.PRNGKey(0), x0, step_size=0.01, n_steps=2000)
  assert nfe == 2000
  x = np.asarray(x, np.float64)
  # Step 0.01 biases the stationary covariance by O(step): within 3% here.
  np.testing.assert_allclose(x.mean(0), [1.0, -2.0], atol=0.06)
  np.testing.assert_allclose(np.cov(x.T), np.asarray(g.covs[0]), atol=0.06)


@pytest.mark.optimized
def test_annealed_langevin_fixes_mode_weights(mixture):
  """NCSN Algorithm 1 recovers the weights that naive Langevin misses (NCSN, section 3.2)."""
  score_fn = lambda x, sigma: mixture.score_at(x, jnp.ones_like(sigma), sigma)
  sigmas = sampling.geometric_sigmas(10.0, 0.01, 10)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (N_SAMPLES, 2), minval=-8, maxval=8)
  x, nfe = sampling.annealed_langevin_dynamics(score_fn, jax.random.PRNGKey(1), x0, sigmas,
                                               n_steps_each=100, step_lr=2e-5, denoise=True)
  assert nfe == 1001
  assert_matches_mixture(mixture, x, WEIGHT_TOL, MEAN_TOL, COV_TOL)
  # Naive Langevin from the same start keeps the wrong weights: mass stays where it started.
  naive, _ = sampling.langevin_dynamics(lambda x, t: score_fn(x, jnp.full(t.shape, 0.01)),
                                        jax.random.PRNGKey(1), x0, 2e-5, 1000)
  weights = np.bincount(np.asarray(mixture.assign(naive)), minlength=3) / N_SAMPLES
  assert np.abs(weights - np.asarray(mixture.weights)).max() > 0.1


def test_pc_sampler_works_on_image_shapes():
  sde = make_sde('vesde', N=10)
  score_fn = lambda x, t: -x / (1.0 + sde.marginal_prob(x, t)[1][:, None, None, None]**2)
  sampler = sampling.get_pc_sampler(sde, (2, 4, 4, 3), 'reverse_diffusion', 'langevin')
  x, _ = sampler(jax.random.PRNGKey(0), score_fn)
  assert x.shape == (2, 4, 4, 3) and bool(jnp.all(jnp.isfinite(x)))


# -----------------------------------------------------------------------------
# The factory and the few-step solvers' evaluation counts.
# -----------------------------------------------------------------------------

FAST_CASES = [('ddim', dict(eta=0.5)), ('heun', dict(churn=5.0)), ('dpm_solver_2m', {}),
              ('dpm_solver_3m', {}), ('dpm_solver_2s', {}), ('unipc', dict(order=3))]


@pytest.mark.parametrize('name,options', FAST_CASES)
@pytest.mark.parametrize('denoise', [False, True])
def test_fast_sampler_nfe_counts_real_evaluations(mixture, name, options, denoise):
  """The NFE returned is the number of calls made, and each sampler's rule (steps x
  evaluations per step, plus the denoise): no skipped final evaluation, no uncounted one."""
  sde = make_sde('subvpsde')
  counter = _CallCounter(mixture.score_fn(sde))
  sampler = sampling.get_sampler(name, sde, (8, 2), steps=5, denoise=denoise, **options)
  x, nfe = sampler(jax.random.PRNGKey(0), counter)
  jax.block_until_ready(x)
  jax.effects_barrier()
  per_step = 2 if name in ('heun', 'dpm_solver_2s') else 1
  assert counter.count == nfe == 5 * per_step + int(denoise)
  assert np.all(np.isfinite(np.asarray(x)))


def test_get_sampler_serves_pc_and_ode_and_explains_bad_requests(mixture):
  assert set(sampling.SAMPLERS) == {'pc', 'ode', 'ddim', 'heun', 'dpm_solver_2m',
                                    'dpm_solver_3m', 'dpm_solver_2s', 'unipc'}
  sde = make_sde('vpsde', N=1000)
  _, nfe = sampling.get_sampler('pc', sde, (8, 2), steps=30)(jax.random.PRNGKey(0),
                                                             mixture.score_fn(sde))
  assert nfe == 60     # steps sets N: 30 predictor + 30 corrector evaluations
  _, nfe = sampling.get_sampler('ode', sde, (8, 2), rtol=1e-3, atol=1e-3)(
      jax.random.PRNGKey(0), mixture.score_fn(sde))
  assert 10 < int(nfe) < 200
  with pytest.raises(ValueError, match=r"Unknown sampler 'dpm'; valid names: \['pc', 'ode', 'ddim'"):
    sampling.get_sampler('dpm', sde, (8, 2))
  with pytest.raises(ValueError, match="'ode' sampler is adaptive"):
    sampling.get_sampler('ode', sde, (8, 2), steps=10)
  with pytest.raises(ValueError, match="sampler 'ddim'.*etta"):
    sampling.get_sampler('ddim', sde, (8, 2), etta=1.0)
  with pytest.raises(ValueError, match='unipc: order must be one of'):
    sampling.get_sampler('unipc', sde, (8, 2), order=4)(jax.random.PRNGKey(0), mixture.score_fn(sde))
  with pytest.raises(ValueError, match='steps must be a positive integer'):
    sampling.get_sampler('pc', sde, (8, 2), steps=0)


def test_fast_samplers_use_the_ode_samplers_prior_draw(mixture):
  """Same key, same prior sample: a fine DPM-Solver++(3M) run lands on the adaptive ODE's
  endpoint (within its tolerance), so the two are comparable sample by sample."""
  sde = make_sde('vesde')
  key = jax.random.PRNGKey(4)
  ode, _ = sampling.get_sampler('ode', sde, (64, 2), eps=1e-5, rtol=1e-6, atol=1e-6)(
      key, mixture.score_fn(sde))
  fine, _ = sampling.get_sampler('dpm_solver_3m', sde, (64, 2), steps=200, eps=1e-5,
                                 denoise=False)(key, mixture.score_fn(sde))
  np.testing.assert_allclose(fine, ode, atol=2e-3)
