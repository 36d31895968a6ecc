"""Sampler steps checked the way diffrax checks its solvers: closed forms and convergence orders.

1. One step of each predictor and corrector, from given x and t with a known score,
   equals REFERENCE.md section 3's formula written out here in float64 NumPy, at every
   level of the sampling grid; the same formula with the level (or time) off by one
   must not match: the tolerance is far tighter than the gap between two levels.
2. Convergence order. For Gaussian data N(mu, s0^2) the exact score is linear in x,
   so every predictor step is affine in x plus Gaussian noise, x' = A x + b + C z, and
   the sampler's output distribution is N(m, v) exactly, with m' = A m + b and
   v' = A^2 v + C^2 (no sampling, no Monte Carlo error). A, b and C are read off the
   real step (at x = 0 and x = 1 with a known z). Started from the exact marginal at T,
   the exact reverse process ends at a known Gaussian; the error |m - m*| + |v - v*|
   against N must have the method's log-log slope.
3. The annealed Langevin kernel: the 'ald' corrector in snr form and NCSN's
   annealed_langevin_dynamics in step_lr form give the same samples from the same key.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sampling
import sde_lib
from conftest import SDE_NAMES, make_sde

# -----------------------------------------------------------------------------
# 1. One step in closed form.
# -----------------------------------------------------------------------------

N_LEVELS = 50
BETA_MIN, BETA_MAX, SIGMA_MIN, SIGMA_MAX = 0.1, 20.0, 0.01, 50.0
RTOL, ATOL = 2e-5, 1e-5


def _score(x, t):
  """A known score that depends on x and t (float32 in JAX, float64 in NumPy alike)."""
  return -(x - 0.3) * (1.0 + t[:, None])


def _grid(sde):
  """One example at each time of the sampler's grid (eps 1e-3), so at every level, and one
  at 0.7 of the way through each level, where rounding the level would pick the next one."""
  timesteps, dt = sampling.reverse_time_grid(sde, 1e-3)
  between = (jnp.arange(sde.N - 1) + 0.7) / (sde.N - 1)
  t = jnp.concatenate([timesteps, between])
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (t.shape[0], 3))
  return x, t, dt


def _level(t32, n, shift=0):
  """Truncation, in float32 as the code computes it, plus an optional (wrong) shift.

  Shifted levels past either end are clipped; ``_valid`` leaves them out of the comparison.
  """
  return np.clip(np.trunc(t32 * np.float32(n - 1)).astype(np.int64) + shift, 0, n - 1)


def _int_beta(t):
  return BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2


def _beta(t):
  return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def _marginal(name, t):
  """(a(t), std(t)) of REFERENCE.md's table, float64."""
  if name == 'vesde':
    return np.ones_like(t), SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN)**t
  b = _int_beta(t)
  return np.exp(-0.5 * b), (np.sqrt(1 - np.exp(-b)) if name == 'vpsde' else 1 - np.exp(-b))


def _drift_g2(name, x, t):
  """Forward drift f(x, t) and g(t)^2, float64."""
  if name == 'vesde':
    return 0 * x, (SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN)**t)**2 * 2 * np.log(SIGMA_MAX / SIGMA_MIN)
  g2 = _beta(t) if name == 'vpsde' else _beta(t) * (1 - np.exp(-2 * _int_beta(t)))
  return -0.5 * _beta(t)[:, None] * x, g2


def _expected_predictor(name, predictor, probability_flow, x, t32, z, shift=0):
  """(x, x_mean) of one predictor step, float64, with the level (or time) shifted by ``shift``."""
  n = N_LEVELS
  t = t32.astype(np.float64)
  s = _score(x, t)
  w = 0.5 if probability_flow else 1.0
  if predictor == 'euler_maruyama' or (predictor == 'reverse_diffusion' and name == 'subvpsde'):
    # Euler–Maruyama with dt = -1/N (sub-VP's discretization is Euler–Maruyama too).
    tt = np.clip(t + shift / (n - 1), 0.0, 1.0)
    s = _score(x, tt)
    f, g2 = _drift_g2(name, x, tt)
    x_mean = x - (f - w * g2[:, None] * s) / n
    noise = np.sqrt(g2 / n)
  elif name == 'vesde':
    i = _level(t32, n, shift)
    sigmas = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN)**(np.arange(n) / (n - 1))
    sig, prev = sigmas[i], np.where(i > 0, sigmas[np.maximum(i - 1, 0)], 0.0)
    var = sig**2 - prev**2
    if predictor == 'reverse_diffusion':      # eq. 46: x - (0 - G^2 s w), G
      x_mean, noise = x + w * var[:, None] * s, np.sqrt(var)
    else:                                     # SMLD ancestral (eq. 47)
      x_mean, noise = x + var[:, None] * s, np.sqrt(prev**2 * var / sig**2)
  elif name == 'vpsde':
    i = _level(t32, n, shift)
    beta = np.linspace(BETA_MIN / n, BETA_MAX / n, n)[i]
    if predictor == 'reverse_diffusion':      # f = (sqrt(1 - beta) - 1) x, G = sqrt(beta)
      f = (np.sqrt(1 - beta) - 1)[:, None] * x
      x_mean, noise = x - (f - w * beta[:, None] * s), np.sqrt(beta)
    else:                                     # DDPM ancestral (eq. 47)
      x_mean, noise = (x + beta[:, None] * s) / np.sqrt(1 - beta)[:, None], np.sqrt(beta)
  else:                                       # sub-VP ancestral: Gaussian posterior step to t - 1/N
    tt = np.clip(t + shift / (n - 1), 1e-3, 1.0)
    s = _score(x, tt)
    ts = np.maximum(tt - 1 / n, 0.0)
    (a_t, std_t), (a_s, std_s) = _marginal(name, tt), _marginal(name, ts)
    a_ts = a_t / a_s
    var_ts = std_t**2 - a_ts**2 * std_s**2
    x0 = (x + (std_t**2)[:, None] * s) / a_t[:, None]
    x_mean = (a_s * var_ts / std_t**2)[:, None] * x0 + (a_ts * std_s**2 / std_t**2)[:, None] * x
    noise = np.sqrt(var_ts * std_s**2 / std_t**2)
  if probability_flow:
    noise = 0 * noise
  return x_mean + noise[:, None] * z, x_mean


def _mismatch(got, want):
  """max |got - want| in units of the test's tolerance (<= 1 passes)."""
  return float(np.max(np.abs(got - want) / (ATOL + RTOL * np.abs(want))))


def _valid(t32, shift):
  i = _level(t32, N_LEVELS) + shift
  return (i >= 0) & (i < N_LEVELS)


PREDICTOR_CASES = [(p, pf) for p in ('euler_maruyama', 'reverse_diffusion', 'ancestral_sampling')
                   for pf in (False, True) if not (p == 'ancestral_sampling' and pf)]


@pytest.mark.parametrize('name', SDE_NAMES)
@pytest.mark.parametrize('predictor,probability_flow', PREDICTOR_CASES)
def test_one_predictor_step_is_the_closed_form(name, predictor, probability_flow):
  sde = make_sde(name, N=N_LEVELS)
  x, t, dt = _grid(sde)
  key = jax.random.PRNGKey(1)
  update = sampling.get_predictor(predictor, probability_flow).update
  got_x, got_mean, state = update(sde, _score, key, x, t, dt, ())
  assert state == ()
  z = np.asarray(jax.random.normal(key, x.shape, x.dtype), np.float64)
  x64, t32 = np.asarray(x, np.float64), np.asarray(t)
  want_x, want_mean = _expected_predictor(name, predictor, probability_flow, x64, t32, z)
  np.testing.assert_allclose(np.asarray(got_mean), want_mean, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=RTOL, atol=ATOL)
  # The neighbouring levels (times, for the continuous-time rules) are far outside the tolerance.
  for shift in (-1, 1):
    ok = _valid(t32, shift)
    wrong_x, wrong_mean = _expected_predictor(name, predictor, probability_flow, x64, t32, z, shift)
    assert _mismatch(np.asarray(got_mean)[ok], wrong_mean[ok]) > 100, shift
    assert _mismatch(np.asarray(got_x)[ok], wrong_x[ok]) > 100, shift


def _expected_corrector(name, corrector, x, t32, zs, snr, shift=0):
  """n_steps of the Langevin corrector, float64 (norms averaged over the batch)."""
  t = t32.astype(np.float64)
  if name == 'vesde':
    alpha = np.ones_like(t)
  else:
    alpha = 1 - np.linspace(BETA_MIN / N_LEVELS, BETA_MAX / N_LEVELS, N_LEVELS)[
        _level(t32, N_LEVELS, shift)]
  x_mean = x
  for z in zs:
    s = _score(x, t)
    if corrector == 'langevin':   # Algorithm 5 of the SDE paper
      ratio = np.mean(np.linalg.norm(z, axis=-1)) / np.mean(np.linalg.norm(s, axis=-1))
      step = 2 * alpha * (snr * ratio)**2
    else:                         # annealed Langevin: 2 alpha (snr std_t)^2
      step = 2 * alpha * (snr * _marginal(name, t)[1])**2
    x_mean = x + step[:, None] * s
    x = x_mean + np.sqrt(2 * step)[:, None] * z
  return x, x_mean


@pytest.mark.parametrize('name', SDE_NAMES)
@pytest.mark.parametrize('corrector', ['langevin', 'ald'])
def test_corrector_steps_are_the_closed_form(name, corrector):
  sde = make_sde(name, N=N_LEVELS)
  x, t, _ = _grid(sde)
  key, snr, n_steps = jax.random.PRNGKey(2), 0.2, 2
  update = sampling.get_corrector(corrector, snr=snr, n_steps=n_steps).update
  got_x, got_mean = update(sde, _score, key, x, t)
  zs = [np.asarray(jax.random.normal(k, x.shape, x.dtype), np.float64)
        for k in jax.random.split(key, n_steps)]
  x64, t32 = np.asarray(x, np.float64), np.asarray(t)
  want_x, want_mean = _expected_corrector(name, corrector, x64, t32, zs, snr)
  np.testing.assert_allclose(np.asarray(got_mean), want_mean, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=RTOL, atol=ATOL)
  if name != 'vesde':   # VP and sub-VP read alpha_i = 1 - beta_i at the level of t
    for shift in (-1, 1):
      ok = _valid(t32, shift)
      wrong_x, _ = _expected_corrector(name, corrector, x64, t32, zs, snr, shift)
      assert _mismatch(np.asarray(got_x)[ok], wrong_x[ok]) > 100, shift


def test_annealed_langevin_one_step_per_level_is_ncsn_code_rule():
  """eps_i = step_lr (sigma_i / sigma_L)^2, x + eps_i s + sqrt(2 eps_i) z: NCSN's code, not alpha/2."""
  sigmas = jnp.array([1.0, 0.1])
  score_fn = lambda x, sigma: -(x - 0.3) / (1.0 + sigma[:, None]**2)
  x0 = jax.random.normal(jax.random.PRNGKey(3), (4, 2))
  key, step_lr = jax.random.PRNGKey(4), 2e-3
  got, nfe = sampling.annealed_langevin_dynamics(score_fn, key, x0, sigmas, n_steps_each=1,
                                                 step_lr=step_lr)
  assert nfe == 2
  x = np.asarray(x0, np.float64)
  for sigma, k in zip((1.0, 0.1), jax.random.split(key, 2)):
    z = np.asarray(jax.random.normal(jax.random.split(k, 1)[0], x.shape), np.float64)
    eps = step_lr * (sigma / 0.1)**2
    x = x + eps * (-(x - 0.3) / (1 + sigma**2)) + np.sqrt(2 * eps) * z
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# 2. Convergence orders on Gaussian data, in float64, without sampling.
# -----------------------------------------------------------------------------

# Data N(MU, S0^2) with S0 near sigma_min: for S0 >> sigma_min the first-order error of VE's
# Euler–Maruyama and ancestral chains nearly cancels (its coefficient, integrated over the
# levels, is proportional to sigma_min^2 / (S0^2 + sigma_min^2)^2), so that they look second
# order until N is far larger. From N = 256 on every method is in its asymptotic regime here
# (the local orders measured between successive N are within 0.9-1.2).
MU, S0 = 0.6, 0.05
ORDER_NS = (256, 512, 1024, 2048)


def _gaussian_score(sde):
  def score(x, t):
    a, std = sde.marginal_coeffs(t)
    return -(x - a[:, None] * MU) / (a[:, None]**2 * S0**2 + std[:, None]**2)
  return score


def _exact_moments(sde, t):
  a, std = (np.asarray(v, np.float64) for v in sde.marginal_coeffs(jnp.array([t], jnp.float64)))
  return float(a[0] * MU), float(a[0]**2 * S0**2 + std[0]**2)


def _target(name, predictor, probability_flow, sde):
  """The exact output distribution the method converges to as N grows.

  Euler–Maruyama ends at t = 0, the marginal there. The DDPM and SMLD chains end
  below their lowest level, at noise 0: the data for VP. SMLD's last step, from
  sigma_min to 0, keeps its size sigma_min^2 however large N is: the target is that
  step applied exactly to the marginal at sigma_min.
  """
  m0, v0 = _exact_moments(sde, 0.0)
  if name != 'vesde' or predictor == 'euler_maruyama':
    return m0, (S0**2 if name != 'vesde' else v0)
  var = SIGMA_MIN**2
  if predictor == 'reverse_diffusion':
    w = 0.5 if probability_flow else 1.0
    return m0, (1 - w * var / v0)**2 * v0 + (0.0 if probability_flow else var)
  return m0, (1 - var / v0)**2 * v0   # ancestral: no noise on the last step


def _step_coefficients(sde, predictor):
  """A, b, C [N] of each of the sampler's N steps, read off the real step.

  The steps act on each example alone, so one call on a batch of 2N examples, the pair
  x = 0 and x = 1 at each of the N times, gives every step's A and b; C = (x - x_mean) / z.
  """
  n = sde.N
  timesteps, dt = sampling.reverse_time_grid(sde, sde.T / n)   # times T - k T/N: one step each
  x = jnp.tile(jnp.array([[0.0], [1.0]], jnp.float64), (n, 1))
  key = jax.random.PRNGKey(0)
  x_new, x_mean, _ = predictor.update(sde, _gaussian_score(sde), key, x, jnp.repeat(timesteps, 2),
                                      dt, ())
  z = jax.random.normal(key, x.shape, x.dtype)
  a, b = x_mean[1::2, 0] - x_mean[0::2, 0], x_mean[0::2, 0]
  return a, b, (x_new[0::2, 0] - x_mean[0::2, 0]) / z[0::2, 0]


def _propagate(sde, coefficients):
  """Mean and variance of the sampler's output, exactly, from the marginal at T."""
  m, v = _exact_moments(sde, sde.T)
  for a, b, c in zip(*(np.asarray(u) for u in coefficients)):
    m, v = a * m + b, a**2 * v + c**2
  return m, v


def _slope(ns, errors):
  return float(np.polyfit(np.log(ns), np.log(errors), 1)[0])


@functools.lru_cache(maxsize=None)
def _order_errors(name):
  """{(predictor, probability_flow): errors at ORDER_NS} for one SDE, from one compiled call."""
  sdes = [make_sde(name, N=n) for n in ORDER_NS]
  predictors = {case: sampling.get_predictor(*case) for case in PREDICTOR_CASES}
  coefficients = jax.jit(lambda: {case: [_step_coefficients(sde, pred) for sde in sdes]
                                  for case, pred in predictors.items()})()
  errors = {}
  for (predictor, probability_flow), coefs in coefficients.items():
    m_star, v_star = _target(name, predictor, probability_flow, sdes[0])
    moments = [_propagate(sde, coef) for sde, coef in zip(sdes, coefs)]
    errors[predictor, probability_flow] = [abs(m - m_star) + abs(v - v_star) for m, v in moments]
  return errors


@pytest.mark.parametrize('name', SDE_NAMES)
@pytest.mark.parametrize('predictor,probability_flow', PREDICTOR_CASES)
def test_predictor_converges_at_first_order(x64, name, predictor, probability_flow):
  errors = _order_errors(name)[predictor, probability_flow]
  slope = _slope(ORDER_NS, errors)
  assert -1.2 < slope < -0.8, (slope, errors)


def _heun(drift, x, n):
  """Heun's method (explicit trapezoid, order 2) with n fixed steps from t = 1 to t = 0."""
  h = -1.0 / n

  def body(k, x):
    t = 1.0 + k * h
    d0 = drift(t, x)
    d1 = drift(t + h, x + h * d0)
    return x + 0.5 * h * (d0 + d1)

  return jax.lax.fori_loop(0, n, body, x)


def test_probability_flow_drift_converges_at_heuns_second_order(x64):
  """Heun with fixed steps on sde.probability_flow_drift vs the exact flow map of a Gaussian.

  The probability-flow map of N(m_t, v_t) marginals is affine: x_0 = m_0 + sqrt(v_0 / v_T) (x_T - m_T).
  A drift with a wrong factor converges elsewhere and its error stalls; a right one falls as 1/N^2.
  """
  x_t = jnp.linspace(-3.0, 3.0, 7, dtype=jnp.float64)[:, None]
  ns = (64, 128, 256)
  for name in SDE_NAMES:
    sde = make_sde(name)
    heun = jax.jit(functools.partial(_heun, sde.probability_flow_drift(_gaussian_score(sde))))
    (m_1, v_1), (m_0, v_0) = _exact_moments(sde, 1.0), _exact_moments(sde, 0.0)
    want = m_0 + np.sqrt(v_0 / v_1) * (np.asarray(x_t) - m_1)
    errors = [float(np.max(np.abs(np.asarray(heun(x_t, n)) - want))) for n in ns]
    slope = _slope(ns, errors)
    assert -2.2 < slope < -1.8, (name, slope, errors)


# -----------------------------------------------------------------------------
# 3. One annealed Langevin kernel, two parameterizations.
# -----------------------------------------------------------------------------


def test_ald_corrector_equals_ncsn_annealed_langevin(x64):
  """snr = sqrt(step_lr / 2) / sigma_L makes the 'ald' corrector take NCSN's exact steps."""
  n_levels, n_steps, step_lr, sigma_min, sigma_max = 6, 4, 2e-5, 0.01, 1.0
  sigmas = sampling.geometric_sigmas(sigma_max, sigma_min, n_levels)
  score_sigma = lambda x, sigma: -(x - 0.3) / (0.25 + sigma[:, None]**2)
  x0 = jax.random.uniform(jax.random.PRNGKey(5), (16, 2), jnp.float64)
  key = jax.random.PRNGKey(6)
  want, _ = sampling.annealed_langevin_dynamics(score_sigma, key, x0, sigmas,
                                                n_steps_each=n_steps, step_lr=step_lr)
  # The same levels as a VE SDE's times: sigma(t_l) = sigma_l at t_l = (L - 1 - l) / (L - 1).
  sde = sde_lib.VESDE(sigma_min=sigma_min, sigma_max=sigma_max, N=n_levels)
  score_t = lambda x, t: score_sigma(x, sde.sigma(t))
  corrector = sampling.get_corrector(
      'ald', snr=sampling.ald_snr_from_step_lr(step_lr, sigma_min), n_steps=n_steps)
  x = x0
  for level, k in enumerate(jax.random.split(key, n_levels)):
    t = jnp.full((16,), (n_levels - 1 - level) / (n_levels - 1), jnp.float64)
    x, _ = corrector.update(sde, score_t, k, x, t)
  np.testing.assert_allclose(np.asarray(x), np.asarray(want), rtol=1e-10, atol=1e-12)
  # NCSN's paper form (alpha_i / 2 with alpha_i = step_lr sigma_i^2 / sigma_L^2) is half
  # this step: it is the snr of step_lr / 2, and its samples differ.
  half, _ = sampling.annealed_langevin_dynamics(score_sigma, key, x0, sigmas,
                                                n_steps_each=n_steps, step_lr=step_lr / 2)
  assert np.abs(np.asarray(half) - np.asarray(want)).max() > 1e-3


def test_step_lr_snr_mapping():
  assert sampling.ald_snr_from_step_lr(2e-5, 0.01) == pytest.approx(np.sqrt(0.1), rel=1e-12)
  for step_lr in (2e-5, 6.2e-6, 3.3e-6, 1.8e-6):
    snr = sampling.ald_snr_from_step_lr(step_lr, 0.01)
    assert sampling.ald_step_lr_from_snr(snr, 0.01) == pytest.approx(step_lr, rel=1e-12)
  # The reference's NCSN configs write these snr values, three decimals of NCSN's step_lr.
  assert [round(sampling.ald_snr_from_step_lr(s, 0.01), 3) for s in (2e-5, 6.2e-6, 3.3e-6, 1.8e-6)] \
      == [0.316, 0.176, 0.128, 0.095]
  with pytest.raises(ValueError, match='step_lr and sigma_min must be positive'):
    sampling.ald_snr_from_step_lr(0.0, 0.01)
  with pytest.raises(ValueError, match='snr and sigma_min must be positive'):
    sampling.ald_step_lr_from_snr(0.3, -1.0)
