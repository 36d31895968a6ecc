"""controllable_generation.py: operators, class guidance and posterior samplers, checked
against exact posteriors (Gaussian data and Gaussian mixtures, under every SDE)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import controllable_generation as cg
import gaussian_mixture
import eval_lib
import sampling
from conftest import SDE_NAMES, make_sde


# ---------------------------------------------------------------------------------------
# Operators.
# ---------------------------------------------------------------------------------------

def _operators():
  key = jax.random.PRNGKey(0)
  mask = np.asarray(jax.random.bernoulli(key, 0.5, (4, 4, 1)))
  return {
      'matrix': cg.MatrixOperator(np.asarray(jax.random.normal(key, (5, 16))), (4, 4, 1)),
      'inpainting': cg.Inpainting(mask),
      'colorization': cg.Colorization((4, 4, 3)),
      'super_resolution': cg.SuperResolution(2, (4, 4, 2)),
      'compressed_sensing': cg.compressed_sensing(key, 6, (4, 4, 1)),
      'fourier': cg.FourierSubsampling(cg.fourier_mask(key, 8, acceleration=4, center_lines=2)),
      'radon': cg.RadonTransform(3, (8, 8, 1)),
  }


OPERATORS = _operators()


def _dense(op):
  """The operator as a [m, d] float64 matrix, column by column."""
  d = int(np.prod(op.x_shape))
  basis = jnp.eye(d).reshape((d,) + op.x_shape)
  return np.asarray(op.forward(basis), np.float64).reshape(d, -1).T


@pytest.mark.parametrize('name', OPERATORS)
def test_adjoint_is_the_transpose(name):
  op = OPERATORS[name]
  a = _dense(op)
  y = jax.random.normal(jax.random.PRNGKey(1), (3,) + op.forward(jnp.zeros((1,) + op.x_shape)).shape[1:])
  got = np.asarray(op.adjoint(y), np.float64).reshape(3, -1)
  np.testing.assert_allclose(got, np.asarray(y, np.float64).reshape(3, -1) @ a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', OPERATORS)
def test_pinv_is_the_minimum_norm_least_squares_solution(name):
  op = OPERATORS[name]
  a = _dense(op)
  x = jax.random.normal(jax.random.PRNGKey(2), (3,) + op.x_shape)
  y = op.forward(x)
  want = np.asarray(y, np.float64).reshape(3, -1) @ np.linalg.pinv(a, rcond=1e-6).T
  got = np.asarray(op.pinv(y), np.float64).reshape(3, -1)
  # Closed forms to float32 round-off; the Radon transform's CG to its stopping tolerance.
  tol = 2e-3 if name == 'radon' else 1e-4
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_operators_compute_what_they_are_named_after():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 3))
  col = OPERATORS['colorization']
  np.testing.assert_allclose(col.forward(x)[..., 0], np.sqrt(3) * x.mean(-1), rtol=1e-5, atol=1e-6)
  q = np.asarray(col.decoupling)
  np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-6)
  np.testing.assert_allclose(q[:, 0], np.full(3, 3**-0.5), rtol=1e-6)
  np.testing.assert_allclose(col.couple(col.decouple(x)), x, atol=1e-5)

  sr = OPERATORS['super_resolution']
  x2 = x[..., :2]
  np.testing.assert_allclose(sr.forward(x2)[:, 1, 0], x2[:, 2:4, 0:2].mean((1, 2)), rtol=1e-5)

  inp = OPERATORS['inpainting']
  x1 = x[..., :1]
  np.testing.assert_array_equal(inp.forward(x1), np.asarray(x1)[:, np.asarray(inp.mask)])

  four = OPERATORS['fourier']
  img = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 1))
  k = np.fft.fft2(np.asarray(img)[..., 0], norm='ortho')
  mask = np.zeros((8, 8), bool)
  mask[np.asarray(four.rows), np.asarray(four.cols)] = True
  assert np.array_equal(mask, mask[(-np.arange(8)) % 8][:, (-np.arange(8)) % 8]), 'not symmetric'
  y = four.forward(img)
  np.testing.assert_allclose(y[..., 0, 0] + 1j * y[..., 0, 1], k[:, mask], rtol=1e-4, atol=1e-5)
  p = _dense(four)
  p = p.T @ p
  np.testing.assert_allclose(p @ p, p, atol=1e-5)        # A^T A is a projection

  radon = cg.RadonTransform(2, (8, 8, 1))                  # angles 0 and pi/2
  y = np.asarray(radon.forward(img))
  np.testing.assert_allclose(y[:, 0, :, 0], np.asarray(img)[..., 0].sum(1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y[:, 1, :, 0], np.asarray(img)[..., 0].sum(2)[:, ::-1], rtol=1e-4,
                             atol=1e-4)


def test_bad_operator_input_fails_clearly():
  with pytest.raises(ValueError, match=r'16 columns but x_shape \(3,\)'):
    cg.MatrixOperator(np.ones((2, 16)), (3,))
  with pytest.raises(ValueError, match=r'acts on examples of shape \(4, 4, 3\)'):
    OPERATORS['colorization'].forward(jnp.zeros((1, 4, 4, 1)))
  with pytest.raises(ValueError, match='factor 3 must divide the image size 4x4'):
    cg.SuperResolution(3, (4, 4, 1))
  with pytest.raises(ValueError, match='square images'):
    cg.RadonTransform(2, (4, 6, 1))
  sde = make_sde('vpsde', N=10)
  op = cg.Inpainting(np.array([True, False]))
  with pytest.raises(ValueError, match=r"Unknown inverse method 'dsp'.*'dps'"):
    cg.get_inverse_sampler(sde, op, (4, 2), 'dsp')
  with pytest.raises(ValueError, match=r"Unknown option\(s\) \['lam'\].*\['weight'\]"):
    cg.get_inverse_sampler(sde, op, (4, 2), 'projection', lam=0.5)
  with pytest.raises(ValueError, match='imputation assumes noiseless'):
    cg.get_inverse_sampler(sde, op, (4, 2), 'imputation', noise_std=0.1)
  with pytest.raises(ValueError, match=r"shape \(4, 3\) does not match .* \(2,\)"):
    cg.get_inverse_sampler(sde, op, (4, 3), 'dps')
  sampler = cg.get_inverse_sampler(sde, op, (4, 2), 'dps')
  with pytest.raises(ValueError, match=r'y has shape \(1, 1\); .* as \(4, 1\)'):
    sampler(jax.random.PRNGKey(0), lambda x, t: -x, jnp.zeros((1, 1)))


def test_fourier_mask_is_symmetric_and_keeps_its_acceleration():
  for size, acceleration in ((32, 4), (16, 2), (64, 8)):
    lines = cg.fourier_mask(jax.random.PRNGKey(size), size, acceleration, center_lines=4)[0]
    assert np.array_equal(lines, lines[(-np.arange(size)) % size])
    assert size // acceleration <= lines.sum() <= size // acceleration + 1, lines.sum()
    assert lines[0] and lines[1] and lines[-1]          # DC and +-1 always


# ---------------------------------------------------------------------------------------
# Class guidance with the mixture's exact class posterior.
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', SDE_NAMES)
def test_class_guidance_with_the_exact_class_posterior_is_the_component_score(mixture, name):
  sde = make_sde(name, N=100)
  key_x, key_t = jax.random.split(jax.random.PRNGKey(5))
  t = jax.random.uniform(key_t, (64,), minval=0.01, maxval=1.0)
  x = mixture.sample(key_x, 64) * 2
  log_prob_fn = functools.partial(mixture.component_log_posterior, sde)
  for k in range(3):
    guided = cg.classifier_guided_score(mixture.score_fn(sde), log_prob_fn, jnp.full((64,), k))
    want = mixture.component(k).perturbed_score(sde, x, t)
    np.testing.assert_allclose(guided(x, t), want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_class_guided_sampler_draws_the_component(mixture):
  """Scale 1 samples component c: its mean and covariance within 4 Monte Carlo standard errors
  plus the PC sampler's own bias at N = 500 (the unguided mixture tests' 0.04 / 0.06)."""
  sde = make_sde('vpsde', N=500)
  n, k = 4000, 1
  guided = cg.classifier_guided_score(mixture.score_fn(sde),
                                      functools.partial(mixture.component_log_posterior, sde),
                                      jnp.full((n,), k))
  x, _ = sampling.get_pc_sampler(sde, (n, 2), 'reverse_diffusion', 'langevin')(
      jax.random.PRNGKey(6), guided)
  x = np.asarray(x, np.float64)
  assert np.mean(np.asarray(mixture.assign(jnp.asarray(x, jnp.float32))) == k) > 0.99
  cov = np.asarray(mixture.covs[k], np.float64)
  se_mean = np.sqrt(np.diag(cov) / n)
  np.testing.assert_allclose(x.mean(0), mixture.means[k], atol=4 * se_mean.max() + 0.04)
  np.testing.assert_allclose(np.cov(x.T), cov, atol=4 * np.sqrt(2 / n) * cov.max() + 0.06)


# ---------------------------------------------------------------------------------------
# Inverse problems: moment matching is exact for Gaussian data.
# ---------------------------------------------------------------------------------------

GAUSSIAN = gaussian_mixture.GaussianMixture.from_covs(
    [1.0], [[0.5, -1.0, 0.3]], [[[1.0, 0.4, 0.2], [0.4, 0.8, -0.3], [0.2, -0.3, 0.6]]])
X_TRUE = np.array([1.2, -0.4, 0.9])


def _point_operators():
  return {'matrix': cg.MatrixOperator([[1.0, -0.5, 0.3], [0.2, 0.7, -1.1]]),
          'mask': cg.Inpainting(np.array([True, False, True])),
          'colorization': cg.Colorization((3,))}


POINT_OPERATORS = _point_operators()


def _measurement(op, noise_std, n):
  y = op.measure(jax.random.PRNGKey(7), jnp.asarray(X_TRUE, jnp.float32)[None], noise_std)
  return y, jnp.broadcast_to(y, (n,) + y.shape[1:])


@pytest.mark.parametrize('noise_std', [0.0, 0.2])
@pytest.mark.parametrize('op_name', POINT_OPERATORS)
@pytest.mark.parametrize('name', SDE_NAMES)
def test_moment_matching_score_is_the_exact_posterior_score(name, op_name, noise_std):
  """With Gaussian data the guided score equals the score of the exact posterior perturbed
  by the SDE, i.e. the guidance term is grad log p_t(y | x_t) exactly, at every t."""
  sde = make_sde(name, N=100)
  op = POINT_OPERATORS[op_name]
  n = 48
  y1, y = _measurement(op, noise_std, n)
  posterior = GAUSSIAN.posterior(_dense(op), y1[0], noise_std)
  t = jnp.tile(jnp.array([1e-3, 0.01, 0.1, 0.3, 0.6, 1.0]), n // 6)
  x = GAUSSIAN.sample(jax.random.PRNGKey(8), n) * 1.5
  score = cg.moment_matching_score(sde, op, GAUSSIAN.score_fn(sde), y, noise_std)
  got = np.asarray(score(x, t))
  want = np.asarray(posterior.perturbed_score(sde, x, t))
  # Relative to each example's largest entry (the score spans orders of magnitude over t).
  rel = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
  assert rel.max() < 2e-3, (rel.max(), np.asarray(t)[np.argmax(rel)])


@pytest.mark.parametrize('name,op_name,noise_std', [('vesde', 'matrix', 0.2), ('vpsde', 'mask', 0.0),
                                                    ('subvpsde', 'colorization', 0.0),
                                                    ('vpsde', 'matrix', 0.0)])
def test_moment_matching_sampler_draws_the_exact_gaussian_posterior(name, op_name, noise_std):
  """Mean and covariance of 3000 samples against the exact posterior: 4 standard errors
  plus 0.03 for the PC sampler's discretization at N = 200."""
  sde = make_sde(name, N=200)
  op = POINT_OPERATORS[op_name]
  n = 3000
  y1, y = _measurement(op, noise_std, n)
  post = GAUSSIAN.posterior(_dense(op), y1[0], noise_std)
  sampler = cg.get_inverse_sampler(sde, op, (n, 3), 'moment_matching', noise_std=noise_std)
  x, nfe = sampler(jax.random.PRNGKey(9), GAUSSIAN.score_fn(sde), y)
  assert nfe == 200
  x = np.asarray(x, np.float64)
  cov = np.asarray(post.covs[0], np.float64)
  se = np.sqrt(np.maximum(np.diag(cov), 1e-4) / n)
  np.testing.assert_allclose(x.mean(0), post.means[0], atol=4 * se.max() + 0.03)
  np.testing.assert_allclose(np.cov(x.T), cov, atol=4 * np.sqrt(2 / n) * cov.max() + 0.03)


# ---------------------------------------------------------------------------------------
# Inverse problems on the 2-D mixture: every method against the exact posterior mixture.
# ---------------------------------------------------------------------------------------

# Noiseless: x_0 = 1.5 observed, the exact posterior puts weights (0, 0.584, 0.416) on the
# modes along x_1. Noisy: 0.6 x_0 + 0.8 x_1 = -1.3 seen with noise 0.2: (0.636, 0, 0.364).
MIXTURE_CASES = {
    'mask': (lambda: cg.Inpainting(np.array([True, False])), [[1.0, 0.0]], 1.5, 0.0),
    'noisy_row': (lambda: cg.MatrixOperator([[0.6, 0.8]]), [[0.6, 0.8]], -1.3, 0.2),
}
# Measured with these keys, N = 500 steps, 2000 samples (the energy distance of two exact
# posterior sample sets is 0.0003 (mask) / 0.0019 (noisy); of the prior to the posterior
# 1.32 / 0.52). Columns: energy distance bound, mode-weight error bound, then the residual
# y - A x: its std bound (noiseless) or its std's interval (noisy; exact posterior 0.186).
# All methods share a bias of about +0.04 towards the middle mode at N = 500.
MIXTURE_BOUNDS = {
    # sde, case, method: (energy distance, weight error, residual)   measured
    ('vpsde', 'mask', 'imputation'): (0.045, 0.08, 1e-5),        # 0.032 0.054 0
    ('vpsde', 'mask', 'projection'): (0.045, 0.08, 1e-5),        # 0.029 0.050 0
    ('vpsde', 'mask', 'dps'): (0.045, 0.07, 0.05),               # 0.030 0.039 0.035
    ('vpsde', 'mask', 'moment_matching'): (0.025, 0.06, 0.02),   # 0.017 0.036 0.015
    ('vesde', 'mask', 'imputation'): (0.05, 0.08, 1e-5),         # 0.035 0.054 0
    ('vesde', 'mask', 'projection'): (0.06, 0.09, 1e-5),         # 0.043 0.062 0
    ('vesde', 'mask', 'dps'): (0.075, 0.11, 0.05),               # 0.055 0.083 0.035
    ('vesde', 'mask', 'moment_matching'): (0.025, 0.06, 0.002),  # 0.017 0.036 0.0002
    ('subvpsde', 'mask', 'imputation'): (0.045, 0.08, 1e-5),     # 0.031 0.052 0
    ('subvpsde', 'mask', 'projection'): (0.045, 0.08, 1e-5),     # 0.034 0.055 0
    ('subvpsde', 'mask', 'dps'): (0.045, 0.07, 0.05),            # 0.031 0.043 0.035
    ('subvpsde', 'mask', 'moment_matching'): (0.025, 0.06, 0.005),  # 0.017 0.037 0.0024
    ('vpsde', 'noisy_row', 'projection'): (0.06, 0.09, (0.16, 0.19)),       # 0.043 0.058 0.173
    ('vpsde', 'noisy_row', 'moment_matching'): (0.075, 0.10, (0.17, 0.20)),  # 0.056 0.070 0.181
    # DPS's step ignores the noise level: it fits y far closer than the posterior does.
    ('vpsde', 'noisy_row', 'dps'): (0.25, 0.19, (0.02, 0.05)),               # 0.190 0.140 0.034
}


@pytest.mark.parametrize('sde_name,case,method', sorted(MIXTURE_BOUNDS))
def test_inverse_methods_on_the_mixture_against_the_exact_posterior(mixture, sde_name, case, method):
  make_op, matrix, y_value, noise_std = MIXTURE_CASES[case]
  op, n = make_op(), 2000
  bound_ed, bound_w, bound_r = MIXTURE_BOUNDS[(sde_name, case, method)]
  posterior = mixture.posterior(matrix, [y_value], noise_std)
  truth = posterior.sample(jax.random.PRNGKey(1), n)
  sde = make_sde(sde_name, N=500)
  options = {'step_size': 0.03} if method == 'dps' else {}
  sampler = cg.get_inverse_sampler(sde, op, (n, 2), method, noise_std=noise_std, **options)
  x, _ = sampler(jax.random.PRNGKey(4), mixture.score_fn(sde), jnp.full((n, 1), y_value))
  x = np.asarray(x)
  assert np.all(np.isfinite(x))
  distance = eval_lib.energy_distance(x, truth)
  weights = np.bincount(np.asarray(mixture.assign(jnp.asarray(x))), minlength=3) / n
  residual = y_value - x @ np.asarray(matrix, np.float32).T
  assert distance < bound_ed, distance
  np.testing.assert_allclose(weights, posterior.weights, atol=bound_w)
  if noise_std == 0:
    assert residual.std() <= bound_r and abs(residual.mean()) <= max(bound_r, 2e-3), residual.std()
  else:
    assert bound_r[0] < residual.std() < bound_r[1], residual.std()


def test_dps_score_is_its_closed_form_and_finite_where_the_residual_vanishes():
  """With a zero score under VE (x0_hat = x), DPS adds 2 zeta / g^2 * A^T r / ||r|| with
  r = y - A x; where r = 0 exactly it adds nothing (sqrt's infinite derivative at 0 once
  turned such a sample into NaN)."""
  sde = make_sde('vesde', N=10)
  op = cg.Inpainting(np.array([True, False]))
  step_size = 0.3
  x = jnp.array([[1.5, 0.7], [0.5, -2.0], [-1.0, 0.4]])
  y = jnp.array([[1.5], [1.0], [1.0]])     # the first example fits y exactly
  t = jnp.full((3,), 0.5)
  score = cg.dps_score(sde, op, lambda x, t: jnp.zeros_like(x), y, step_size)(x, t)
  _, g = sde.discretize(x, t)
  r = np.asarray(y - op.forward(x))
  norm = np.linalg.norm(r, axis=1, keepdims=True)
  back = np.asarray(op.adjoint(jnp.asarray(r)))
  want = np.where(norm > 0, 2 * step_size / np.asarray(g)[:, None]**2 * back / np.maximum(norm, 1e-30), 0)
  assert np.all(np.isfinite(np.asarray(score))), score
  np.testing.assert_allclose(np.asarray(score), want, rtol=1e-5, atol=1e-7)
  assert not np.any(np.asarray(score)[0])


@pytest.mark.parametrize('name', SDE_NAMES)
def test_isotropic_moment_matching_is_exact_for_isotropic_gaussian_data(name):
  """Cov[x_0 | x_t] = v s^2 / (a^2 v + s^2) I exactly when the data are N(mu, v I)."""
  v = 0.7
  data = gaussian_mixture.GaussianMixture.from_covs([1.0], [[0.5, -1.0, 0.3]], [v * np.eye(3)])
  sde = make_sde(name, N=100)
  op = POINT_OPERATORS['matrix']
  y1 = op.forward(jnp.asarray(X_TRUE, jnp.float32)[None])
  n = 24
  t = jnp.tile(jnp.array([0.01, 0.1, 0.5, 1.0]), n // 4)
  x = data.sample(jax.random.PRNGKey(8), n)
  score = cg.moment_matching_score(sde, op, data.score_fn(sde), jnp.broadcast_to(y1, (n, 2)), 0.1,
                                   covariance='isotropic', data_var=v)
  want = np.asarray(data.posterior(_dense(op), y1[0], 0.1).perturbed_score(sde, x, t))
  rel = np.abs(np.asarray(score(x, t)) - want).max(axis=1) / np.abs(want).max(axis=1)
  assert rel.max() < 2e-3, rel.max()
  # Above max_time the guidance is off: the score is the unconditional one.
  capped = cg.moment_matching_score(sde, op, data.score_fn(sde), jnp.broadcast_to(y1, (n, 2)), 0.1,
                                    covariance='isotropic', data_var=v, max_time=0.3)
  got = np.asarray(capped(x, t))
  high = np.asarray(t) > 0.3
  np.testing.assert_allclose(got[high], np.asarray(data.perturbed_score(sde, x, t))[high], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(got[~high], np.asarray(score(x, t))[~high], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="covariance must be 'jacobian' or 'isotropic'"):
    cg.moment_matching_score(sde, op, data.score_fn(sde), y1, covariance='diagonal')
