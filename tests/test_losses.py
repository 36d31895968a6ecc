"""Score-matching losses: closed-form values at the exact score, and training a small MLP."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate

import losses
import sampling
from conftest import SDE_NAMES, assert_matches_mixture, make_sde
from models.mlp import ScoreMLP

MU = np.array([0.7, -1.2])
VAR = 0.5
N_CHUNKS, CHUNK = 40, 4000


def _gaussian_score(sde, theta=(1.0, 1.0)):
  """Score of the perturbed N(MU, VAR I), exact at theta = (1, 1)."""
  def score_fn(x, t):
    a, std = sde.marginal_coeffs(t)
    a, std = a[:, None], std[:, None]
    return -(x - a * theta[0] * MU[None]) / (a**2 * VAR * theta[1] + std**2)
  return score_fn


def _gaussian_data(key, n):
  return jnp.asarray(MU)[None] + np.sqrt(VAR) * jax.random.normal(key, (n, 2))


def _chunked(fn):
  """Mean and standard error of fn(key) over independent chunks."""
  keys = jax.random.split(jax.random.PRNGKey(0), N_CHUNKS)
  vals = np.asarray(jax.lax.map(fn, keys), np.float64)
  return vals.mean(0), vals.std(0) / np.sqrt(N_CHUNKS)


def _expected_over_t(sde, integrand, eps):
  """E_{t ~ U(eps, T)} of integrand(a, std, g) by quadrature."""
  def f(t):
    tt = jnp.array([t])
    a, std = sde.marginal_coeffs(tt)
    g = sde.sde(jnp.zeros((1, 1)), tt)[1]
    return float(integrand(float(a[0]), float(std[0]), float(g[0])))
  return scipy.integrate.quad(f, eps, sde.T, limit=200)[0] / (sde.T - eps)


@pytest.mark.optimized
@pytest.mark.parametrize('name', SDE_NAMES)
@pytest.mark.parametrize('likelihood_weighting', [False, True])
def test_dsm_loss_at_exact_score_is_its_constant(name, likelihood_weighting):
  """E || z + std s*(x_t) ||^2 per dim = a^2 v / (a^2 v + std^2); times g^2 / std^2 with likelihood weighting."""
  sde = make_sde(name)
  eps = 1e-3 if likelihood_weighting else 1e-5
  score_fn = _gaussian_score(sde)

  def chunk(key):
    k_data, k_loss = jax.random.split(key)
    return losses.dsm_loss(score_fn, sde, k_loss, _gaussian_data(k_data, CHUNK), eps=eps,
                           likelihood_weighting=likelihood_weighting)

  mean, se = _chunked(chunk)
  weight = (lambda a, s, g: g**2 / s**2) if likelihood_weighting else (lambda a, s, g: 1.0)
  expected = _expected_over_t(sde, lambda a, s, g: weight(a, s, g) * a**2 * VAR / (a**2 * VAR + s**2), eps)
  assert abs(mean - expected) < 5 * se + 1e-3 * abs(expected)


@pytest.mark.parametrize('name', SDE_NAMES)
def test_dsm_gradient_vanishes_at_exact_score(name):
  sde = make_sde(name)

  def grad_at(theta):
    def chunk(key):
      k_data, k_loss = jax.random.split(key)
      x = _gaussian_data(k_data, CHUNK)
      return jax.grad(lambda th: losses.dsm_loss(_gaussian_score(sde, th), sde, k_loss, x))(theta)
    return _chunked(chunk)

  g, se = grad_at(jnp.array([1.0, 1.0]))
  assert np.all(np.abs(g) < 5 * se + 1e-4), (g, se)
  g, se = grad_at(jnp.array([1.2, 0.8]))          # away from the optimum it does not vanish
  assert np.any(np.abs(g) > 10 * se), (g, se)


def test_smld_loss_at_exact_score():
  sde = make_sde('vesde', N=100)
  score_fn = _gaussian_score(sde)   # VE: sigma(t_i) equals the i-th discrete sigma

  def chunk(key):
    k_data, k_loss = jax.random.split(key)
    return losses.smld_loss(score_fn, sde, k_loss, _gaussian_data(k_data, CHUNK))

  mean, se = _chunked(chunk)
  sigmas = np.asarray(sde.discrete_sigmas, np.float64)
  expected = np.mean(VAR / (VAR + sigmas**2))
  assert abs(mean - expected) < 5 * se + 1e-3


def test_ddpm_loss_at_exact_score():
  sde = make_sde('vpsde', N=100)
  abar_all = sde.alphas_cumprod

  def score_fn(x, t):   # exact score of the discrete chain's marginal at level i = t (N - 1)
    abar = abar_all[jnp.round(t * (sde.N - 1)).astype(jnp.int32)][:, None]
    return -(x - jnp.sqrt(abar) * MU[None]) / (abar * VAR + 1 - abar)

  def chunk(key):
    k_data, k_loss = jax.random.split(key)
    return losses.ddpm_loss(score_fn, sde, k_loss, _gaussian_data(k_data, CHUNK))

  mean, se = _chunked(chunk)
  abar = np.asarray(abar_all, np.float64)
  expected = np.mean(abar * VAR / (abar * VAR + 1 - abar))
  assert abs(mean - expected) < 5 * se + 1e-3


@pytest.mark.parametrize('name', SDE_NAMES)
def test_esm_at_exact_score(name):
  """tr(ds/dx) + ||s||^2 / 2 has expectation -D / (2 C) at the exact score, C = a^2 v + std^2."""
  sde = make_sde(name)
  score_fn = _gaussian_score(sde)

  def chunk(key):
    k_data, k_loss = jax.random.split(key)
    return losses.esm_loss(score_fn, sde, k_loss, _gaussian_data(k_data, CHUNK), reduce='sum')

  mean, se = _chunked(chunk)
  expected = _expected_over_t(sde, lambda a, s, g: s**2 * -2 / (2 * (a**2 * VAR + s**2)), 1e-5)
  assert abs(mean - expected) < 5 * se + 1e-3


@pytest.mark.parametrize('likelihood_weighting', [False, True])
def test_dsm_equals_implicit_score_matching_up_to_a_constant(likelihood_weighting):
  """Vincent (2011): DSM('sum') - ESM = lambda(t) D / (2 std^2) in expectation, for ANY score."""
  sde = make_sde('vpsde')
  eps = 1e-2
  wrong_score = _gaussian_score(sde, theta=(0.5, 2.0))
  kwargs = dict(eps=eps, likelihood_weighting=likelihood_weighting, reduce='sum')

  def chunk(key):
    k_data, k_loss = jax.random.split(key)
    x = _gaussian_data(k_data, CHUNK)
    # The same key: the same t and x_t in both objectives.
    return (losses.dsm_loss(wrong_score, sde, k_loss, x, **kwargs)
            - losses.esm_loss(wrong_score, sde, k_loss, x, **kwargs))

  # dsm_loss and esm_loss split their keys differently: compare expectations only.
  mean, se = _chunked(chunk)
  weight = (lambda a, s, g: g**2 / s**2) if likelihood_weighting else (lambda a, s, g: 1.0)
  expected = _expected_over_t(sde, lambda a, s, g: weight(a, s, g) * 2 / 2, eps)
  assert abs(mean - expected) < 5 * se + 1e-3 * abs(expected)


@pytest.mark.parametrize('projection', ['rademacher', 'gaussian'])
@pytest.mark.parametrize('variance_reduction', [False, True])
def test_sliced_score_matching_is_unbiased_for_exact(projection, variance_reduction):
  """At any x, SSM's expectation over projections is tr(ds/dx) + ||s||^2 / 2."""
  sde = make_sde('vesde')
  score_fn = _gaussian_score(sde, theta=(0.8, 1.5))
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 2)) * 2
  t = jnp.linspace(0.05, 1.0, 64)
  exact = np.asarray(losses.exact_score_matching(score_fn, x, t), np.float64)
  est = np.asarray(losses.sliced_score_matching(score_fn, jax.random.PRNGKey(1), x, t,
                                                n_projections=4000, projection=projection,
                                                variance_reduction=variance_reduction), np.float64)
  single = np.stack([np.asarray(losses.sliced_score_matching(score_fn, k, x, t, projection=projection,
                                                             variance_reduction=variance_reduction))
                     for k in jax.random.split(jax.random.PRNGKey(2), 50)])
  se = single.std(0) / np.sqrt(4000) + 1e-6
  assert np.all(np.abs(est - exact) < 5 * se + 1e-4 * np.abs(exact))


def test_exact_score_matching_trace():
  score_fn = lambda x, t: jnp.stack([x[:, 0]**2 * x[:, 1], jnp.sin(x[:, 1])], -1)
  x = jnp.array([[1.0, 2.0], [0.5, -1.0]])
  t = jnp.zeros(2)
  trace = 2 * x[:, 0] * x[:, 1] + jnp.cos(x[:, 1])
  expected = trace + 0.5 * jnp.sum(score_fn(x, t)**2, -1)
  np.testing.assert_allclose(losses.exact_score_matching(score_fn, x, t), expected, rtol=1e-6)


def test_bad_arguments():
  sde = make_sde('vpsde')
  x = jnp.zeros((4, 2))
  score_fn = lambda x, t: -x
  with pytest.raises(ValueError, match=r"reduce 'max'"):
    losses.dsm_loss(score_fn, sde, jax.random.PRNGKey(0), x, reduce='max')
  with pytest.raises(ValueError, match='eps must lie in'):
    losses.dsm_loss(score_fn, sde, jax.random.PRNGKey(0), x, eps=0.0)
  with pytest.raises(TypeError, match='VESDE'):
    losses.smld_loss(score_fn, sde, jax.random.PRNGKey(0), x)
  with pytest.raises(TypeError, match='VPSDE'):
    losses.ddpm_loss(score_fn, make_sde('vesde'), jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="projection 'uniform'"):
    losses.sliced_score_matching(score_fn, jax.random.PRNGKey(0), x, jnp.zeros(4), projection='uniform')
  with pytest.raises(ValueError, match=r"Unknown loss 'l2'.*dsm"):
    losses.get_loss('l2')


# ---------------------------------------------------------------------------------------
# Training: a small MLP trained with each loss gives samples that match the mixture.
# ---------------------------------------------------------------------------------------

N_TRAIN_STEPS = 2000
TRAINING_CASES = [
    ('vesde', 'dsm', {}),
    ('vpsde', 'dsm', {}),
    ('subvpsde', 'dsm', {}),
    ('vpsde', 'dsm', {'likelihood_weighting': True}),
    ('vesde', 'smld', {}),
    ('vpsde', 'ddpm', {}),
    ('vpsde', 'ssm', {}),
    ('vpsde', 'ssm', {'variance_reduction': True}),
    ('vpsde', 'esm', {}),
]


def _network_score(model, sde, data_var, discrete_ddpm=False):
  """score = -net(c_in x, t) / std(t), with inputs scaled to unit variance (c_in).

  For the discrete DDPM chain, a and std are those of level i = t (N - 1):
  sqrt(abar_i) and sqrt(1 - abar_i) (level 0 sits at t = 0, where the SDE's std is 0).
  """
  def score_fn(params, x, t):
    if discrete_ddpm:
      abar = sde.alphas_cumprod[jnp.round(t * (sde.N - 1)).astype(jnp.int32)]
      a, std = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    else:
      a, std = sde.marginal_coeffs(t)
    c_in = 1 / jnp.sqrt(a**2 * data_var + std**2)
    return -model.apply(params, x * c_in[:, None], t) / std[:, None]
  return score_fn


@pytest.mark.slow
@pytest.mark.optimized
@pytest.mark.parametrize('name,loss_name,kwargs', TRAINING_CASES)
def test_training_with_each_loss_matches_the_mixture(mixture, name, loss_name, kwargs):
  sde = make_sde(name, N=500)
  model = ScoreMLP(hidden=(128, 128, 128))
  data_var = float(jnp.var(mixture.sample(jax.random.PRNGKey(9), 10_000)))
  score = _network_score(model, sde, data_var, discrete_ddpm=loss_name == 'ddpm')
  loss = functools.partial(losses.get_loss(loss_name), **kwargs)
  if loss_name in ('dsm', 'ssm', 'esm'):
    loss = functools.partial(loss, eps=1e-3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  schedule = optax.cosine_decay_schedule(2e-3, N_TRAIN_STEPS)
  optimizer = optax.adam(schedule)

  @jax.jit
  def train(params):
    def step(carry, key):
      params, opt_state = carry
      k_data, k_loss = jax.random.split(key)
      x = mixture.sample(k_data, 256)
      value, grads = jax.value_and_grad(
          lambda p: loss(jax.tree_util.Partial(score, p), sde, k_loss, x))(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), value
    (params, _), values = jax.lax.scan(step, (params, optimizer.init(params)),
                                       jax.random.split(jax.random.PRNGKey(1), N_TRAIN_STEPS))
    return params, values

  params, values = train(params)
  assert np.all(np.isfinite(np.asarray(values)))
  # DPM-Solver++(2M) at 20 NFE: on the exact score it matches the mixture as closely as PC at
  # 2000 NFE (tests/test_fast_samplers.py), at a hundredth of the evaluations of PC's 500 steps.
  sampler = sampling.get_sampler('dpm_solver_2m', sde, (4000, 2), steps=19)
  x, _ = sampler(jax.random.PRNGKey(2), jax.tree_util.Partial(score, params))
  # Looser bounds than with the exact score: a small network after a short training.
  assert_matches_mixture(mixture, x, weight_tol=0.08, mean_tol=0.25, cov_tol=0.15)
