"""Few-step samplers of the probability-flow ODE: DDIM, EDM's Heun, DPM-Solver++ and UniPC.

Each is written on the SDE's marginal coefficients, x_t = a(t) x_0 + std(t) z, so VE, VP
and sub-VP are served by the same code: no sampler special-cases an SDE class. The
variables they step in are derived from (a, std), once, on the SDE:

  data prediction  x0(x, t) = (x + std^2 s) / a        ``sde.tweedie_mean``
  noise prediction eps(x, t) = -std s                 ``sde.noise_prediction``
  log-SNR          lambda(t) = log(a / std)           ``sde.log_snr`` / ``sde.time_at_log_snr``
  EDM variables    x~ = x / a, sigma~ = std / a = exp(-lambda), D(x~; sigma~) = x0

Every solver starts from a prior sample at t = T and steps through a time grid
T = t_0 > t_1 > ... > t_M = eps (M = ``steps``), built by one of the grid functions
below or passed in. With ``denoise`` it ends with x0(x, eps): the step from sigma~(eps)
to 0 that EDM takes with Euler, counted as one more evaluation. ``nfe`` is the number of
score evaluations, the same number the compiled code makes (tests count calls).

The data-prediction solvers integrate the exact form of the ODE in lambda (DPM-Solver++,
eq. 9; h = lambda_s - lambda_t > 0 from t to s < t):

  x_s = (std_s / std_t) x_t + a_s e^{-h} int_0^h e^u x0(lambda_t + u) du,

and differ in how they approximate x0 over the step: constant (DDIM = DPM-Solver-1),
extrapolated from earlier steps (DPM-Solver++ 2M / 3M, UniPC's predictor), from a midpoint
(2S), or interpolated through the next step's evaluation (UniPC's corrector).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

import sde_lib
from sde_lib import batch_broadcast

# -----------------------------------------------------------------------------
# Time grids: T = t_0 > ... > t_M = eps, M = steps, as arrays [steps + 1].
# -----------------------------------------------------------------------------


def uniform_grid(sde: sde_lib.SDE, steps: int, eps: float):
  """Equal steps in t (DDIM's uniform spacing)."""
  return jnp.linspace(sde.T, eps, steps + 1)


def quadratic_grid(sde: sde_lib.SDE, steps: int, eps: float):
  """t - eps proportional to (M - i)^2: DDIM's quadratic spacing, dense near the data."""
  frac = jnp.linspace(1.0, 0.0, steps + 1)
  return eps + (sde.T - eps) * frac**2


def log_snr_grid(sde: sde_lib.SDE, steps: int, eps: float):
  """Equal steps in lambda = log(a / std) (DPM-Solver's 'logSNR' spacing)."""
  ends = sde.log_snr(jnp.array([sde.T, eps]))
  return _pin_ends(sde.time_at_log_snr(jnp.linspace(ends[0], ends[1], steps + 1)), sde.T, eps)


def karras_grid(sde: sde_lib.SDE, steps: int, eps: float, rho: float = 7.0):
  """EDM's levels sigma~_i = (smax^(1/rho) + i/M (smin^(1/rho) - smax^(1/rho)))^rho (eq. 5)."""
  smax, smin = jnp.exp(-sde.log_snr(jnp.array([sde.T, eps])))
  frac = jnp.linspace(0.0, 1.0, steps + 1)
  sigma = (smax**(1 / rho) + frac * (smin**(1 / rho) - smax**(1 / rho)))**rho
  return _pin_ends(sde.time_at_log_snr(-jnp.log(sigma)), sde.T, eps)


def _pin_ends(times, t_max, t_min):
  """The grid's end points exactly T and eps (a round trip through lambda moves them by ulps)."""
  return times.at[0].set(t_max).at[-1].set(t_min)


GRIDS = {'uniform': uniform_grid, 'quadratic': quadratic_grid, 'log_snr': log_snr_grid,
         'karras': karras_grid}


def make_grid(sde: sde_lib.SDE, grid, steps: int, eps: float):
  """A grid by name (``GRIDS``), a function ``(sde, steps, eps) -> times`` or the times themselves.

  The times must fall strictly from at most T to above 0: a step of zero size would be a
  wasted evaluation, a time of 0 or below a division by std = 0.
  """
  if isinstance(grid, str):
    if grid not in GRIDS:
      raise ValueError(f'Unknown time grid {grid!r}; valid names: {sorted(GRIDS)}')
    grid = GRIDS[grid]
  if callable(grid):
    if not isinstance(steps, int) or steps < 1:
      raise ValueError(f'steps must be a positive integer, got {steps!r}')
    if not 0.0 < eps < sde.T:
      raise ValueError(f'eps must lie in (0, T = {sde.T}), got {eps}')
    grid = grid(sde, steps, eps)
  times = jnp.asarray(grid, jnp.result_type(float))   # float64 when x64 is on
  t = jax.device_get(times)
  if times.ndim != 1 or times.shape[0] < 2:
    raise ValueError(f'a time grid needs at least 2 times in a 1-D array, got shape {times.shape}')
  if not ((t[1:] < t[:-1]).all() and t[0] <= sde.T and t[-1] > 0):
    raise ValueError(f'time grid must decrease strictly from <= T = {sde.T} to > 0, got {t}')
  return times


# -----------------------------------------------------------------------------
# Shared pieces.
# -----------------------------------------------------------------------------


def _model(sde, score_fn, x, t):
  """(x0, eps) predicted at a scalar time t for the batch x: one score evaluation."""
  t_vec = jnp.full(x.shape[:1], t, x.dtype)
  score = score_fn(x, t_vec)
  return sde.tweedie_mean(x, t_vec, score), sde.noise_prediction(t_vec, score)


def _data_prediction(sde, score_fn, x, t):
  return _model(sde, score_fn, x, t)[0]


def _finish(sde, score_fn, x, t_last, denoise):
  """With ``denoise``, the x0 prediction at the last time (EDM's step to sigma~ = 0)."""
  return _data_prediction(sde, score_fn, x, t_last) if denoise else x


def _coeffs(sde, t):
  a, std = sde.marginal_coeffs(t)
  return a, std, sde.log_snr(t)


def _exp_integrals(h, n: int):
  """I_k = e^{-h} int_0^h e^u u^k / k! du for k = 0..n-1, by I_k = h^k / k! - I_{k-1}.

  The weights of an exact quadrature of x0's Taylor terms over one step; I_0 = 1 - e^{-h}.
  """
  out = [-jnp.expm1(-h)]
  for k in range(1, n):
    out.append(h**k / math.factorial(k) - out[-1])
  return out


def _polynomial_update(x, m0, diffs, ratios, h, std_ratio, a_s):
  """One step with x0 over the step taken as the polynomial through m0 and the given points.

  ``diffs[k] = (m_k - m0) / r_k`` for points at lambda_t + r_k h. Writing x0(lambda_t + r h) =
  m0 + sum_n c_n r^n, the divided differences satisfy diffs = R^T c with R[n, k] = r_k^n
  (n = 0..K-1), and the exact integral of the polynomial is
  a_s (I_0 m0 + sum_n n! I_n / h^n c_n). K = len(diffs): degree K, local order K + 1.
  """
  k = len(diffs)
  ints = _exp_integrals(h, k + 1)
  out = batch_broadcast(std_ratio, x) * x + batch_broadcast(a_s * ints[0], x) * m0
  if k == 0:
    return out
  beta = jnp.stack([math.factorial(n) * ints[n] / h**n for n in range(1, k + 1)])
  r = jnp.stack(ratios)
  vander = r[None, :]**jnp.arange(k, dtype=r.dtype)[:, None]
  rho = jnp.linalg.solve(vander, beta)
  for w, d in zip(rho, diffs):
    out = out + batch_broadcast(a_s * w, x) * d
  return out


def _per_step_order(order: int, steps: int, lower_order_final: bool):
  """Order of step i: warm-up min(order, i + 1) (history fills up) and, for short runs
  (< 15 steps, diffusers' threshold; DPM-Solver's own code uses < 10) with
  ``lower_order_final``, min(order, M - i) at the end, which keeps few-step multistep
  solvers stable (k-diffusion #43, #85)."""
  i = jnp.arange(steps)
  orders = jnp.minimum(order, i + 1)
  if lower_order_final and steps < 15:
    orders = jnp.minimum(orders, steps - i)
  return orders


def _check_order(name, order, allowed):
  if order not in allowed:
    raise ValueError(f'{name}: order must be one of {allowed}, got {order!r}')


# -----------------------------------------------------------------------------
# DDIM (Song, Meng & Ermon 2021).
# -----------------------------------------------------------------------------


def ddim(sde, score_fn, key, x, times, *, eta: float = 0.0, denoise: bool = True):
  """DDIM, eq. 12: x_s = a_s x0 + sqrt(std_s^2 - sigma^2) eps + sigma z.

  sigma^2 = eta^2 Var[x_s | x_t, x0], the variance of the forward process's posterior
  (eq. 16 of DDIM, written for any (a, std)): eta = 0 is the deterministic sampler (the
  first-order solver of the probability-flow ODE), eta = 1 ancestral sampling. One
  evaluation per step.
  """
  def step(x, inputs):
    t, s, key = inputs
    a_t, std_t, _ = _coeffs(sde, t)
    a_s, std_s, _ = _coeffs(sde, s)
    x0, eps = _model(sde, score_fn, x, t)
    if eta == 0:
      return (a_s * x0 + std_s * eps).astype(x.dtype), None
    post_var = std_s**2 * (1.0 - (a_t / a_s * std_s / std_t)**2)
    var = eta**2 * jnp.maximum(post_var, 0.0)
    z = jax.random.normal(key, x.shape, x.dtype)
    return (a_s * x0 + jnp.sqrt(std_s**2 - var) * eps + jnp.sqrt(var) * z).astype(x.dtype), None

  keys = jax.random.split(key, times.shape[0] - 1)
  x, _ = jax.lax.scan(step, x, (times[:-1], times[1:], keys))
  return _finish(sde, score_fn, x, times[-1], denoise)


# -----------------------------------------------------------------------------
# EDM (Karras et al. 2022): Heun in (x~, sigma~), Algorithms 1 and 2.
# -----------------------------------------------------------------------------


def edm_heun(sde, score_fn, key, x, times, *, churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float('inf'), s_noise: float = 1.0, denoise: bool = True):
  """EDM's sampler on dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~.

  With ``churn`` = 0 it is Algorithm 1 (deterministic Heun, second order); with churn > 0,
  Algorithm 2: before each step from a level sigma~_i in [s_tmin, s_tmax], noise raises it to
  sigma^ = (1 + gamma) sigma~_i, gamma = min(churn / L, sqrt(2) - 1) with L = M + 1 the
  number of non-zero levels, and the step runs from sigma^. sigma^ is capped at sigma~(T):
  the network is never asked about a time past T. Algorithm 1's last step, Euler from the
  last level to sigma~ = 0, is ``denoise`` (x~ = D, after the churn of that level). Two
  evaluations per step.
  """
  steps = times.shape[0] - 1
  gamma_max = min(churn / (steps + 1), math.sqrt(2.0) - 1.0) if churn > 0 else 0.0
  sig = jnp.exp(-sde.log_snr(times))          # sigma~ of the grid
  a0 = sde.marginal_coeffs(times[0])[0]

  def denoiser(xt, t):                         # D(x~; sigma~(t)) through x = a x~
    a = sde.marginal_coeffs(t)[0]
    return _data_prediction(sde, score_fn, a * xt, t)

  def churned(xt, t, sig_t, key):
    """Algorithm 2's noise: (x^, t^, sigma^) from the level (t, sigma~_t)."""
    if churn <= 0:
      return xt, t, sig_t
    gamma = jnp.where((sig_t >= s_tmin) & (sig_t <= s_tmax), gamma_max, 0.0)
    gamma = jnp.clip(sig[0] / sig_t - 1.0, 0.0, gamma)        # sigma^ <= sigma~(T)
    sig_hat = sig_t * (1.0 + gamma)
    z = jax.random.normal(key, xt.shape, xt.dtype)
    xt = xt + jnp.sqrt(jnp.maximum(sig_hat**2 - sig_t**2, 0.0)) * s_noise * z
    t_hat = jnp.where(sig_hat > sig_t, sde.time_at_log_snr(-jnp.log(sig_hat)), t)
    return xt, jnp.minimum(t_hat, times[0]), sig_hat

  def step(xt, inputs):
    t, s, sig_t, sig_s, key = inputs
    xt, t, sig_t = churned(xt, t, sig_t, key)
    d = (xt - denoiser(xt, t)) / sig_t
    x_euler = xt + (sig_s - sig_t) * d
    d_next = (x_euler - denoiser(x_euler, s)) / sig_s
    return (xt + (sig_s - sig_t) * 0.5 * (d + d_next)).astype(xt.dtype), None

  keys = jax.random.split(key, steps + 1)
  xt, _ = jax.lax.scan(step, (x / a0).astype(x.dtype),
                       (times[:-1], times[1:], sig[:-1], sig[1:], keys[:-1]))
  if denoise:
    xt, t, _ = churned(xt, times[-1], sig[-1], keys[-1])
    return denoiser(xt, t)
  return sde.marginal_coeffs(times[-1])[0] * xt


# -----------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022), data prediction.
# -----------------------------------------------------------------------------


def dpm_solver_multistep(sde, score_fn, key, x, times, *, order: int = 2,
                         lower_order_final: bool = True, denoise: bool = True):
  """DPM-Solver++(2M) (Algorithm 2) or (3M): one evaluation per step, x0 of earlier steps reused.

  2M: x_s = (std_s / std_t) x_t - a_s (e^{-h} - 1) D with D = (1 + 1/(2r)) m_t - m_prev / (2r),
  r = h_prev / h (the paper's update, second order). 3M: x0 extrapolated by the quadratic
  through the last three predictions and integrated exactly (third order). The first steps
  run at the order the history allows; see ``_per_step_order`` for the final ones.
  """
  _check_order('dpm_solver_multistep', order, (1, 2, 3))
  del key
  steps = times.shape[0] - 1
  orders = _per_step_order(order, steps, lower_order_final)

  def step(carry, inputs):
    x, ms, lams = carry                        # x0 and lambda of the last `order` times
    t, s, step_order = inputs
    a_t, std_t, lam_t = _coeffs(sde, t)
    a_s, std_s, lam_s = _coeffs(sde, s)
    m0 = _data_prediction(sde, score_fn, x, t)
    h = lam_s - lam_t
    std_ratio = std_s / std_t

    def first(_):
      return _polynomial_update(x, m0, [], [], h, std_ratio, a_s)

    def second(_):
      r = (lam_t - lams[0]) / h
      d = (1.0 + 0.5 / r) * m0 - (0.5 / r) * ms[0]
      return batch_broadcast(std_ratio, x) * x - a_s * jnp.expm1(-h) * d

    def third(_):
      ratios = [(lams[0] - lam_t) / h, (lams[1] - lam_t) / h]
      diffs = [(ms[0] - m0) / ratios[0], (ms[1] - m0) / ratios[1]]
      return _polynomial_update(x, m0, diffs, ratios, h, std_ratio, a_s)

    x_new = jax.lax.switch(step_order - 1, [first, second, third][:order], None).astype(x.dtype)
    ms = jnp.concatenate([m0[None], ms[:-1]])
    lams = jnp.concatenate([lam_t[None], lams[:-1]])
    return (x_new, ms, lams), None

  hist = max(order - 1, 1)
  init = (x, jnp.zeros((hist,) + x.shape, x.dtype), jnp.zeros((hist,), times.dtype))
  (x, _, _), _ = jax.lax.scan(step, init, (times[:-1], times[1:], orders))
  return _finish(sde, score_fn, x, times[-1], denoise)


def dpm_solver_2s(sde, score_fn, key, x, times, *, denoise: bool = True):
  """DPM-Solver++(2S) (Algorithm 1, r = 1/2): a midpoint in lambda, two evaluations per step.

  u = (std_m / std_t) x_t - a_m (e^{-h/2} - 1) x0(x_t, t) at lambda_m = lambda_t + h/2, then
  x_s = (std_s / std_t) x_t - a_s (e^{-h} - 1) x0(u, t_m).
  """
  del key

  def step(x, inputs):
    t, s = inputs
    a_t, std_t, lam_t = _coeffs(sde, t)
    a_s, std_s, lam_s = _coeffs(sde, s)
    h = lam_s - lam_t
    t_mid = sde.time_at_log_snr(lam_t + 0.5 * h)
    a_m, std_m, _ = _coeffs(sde, t_mid)
    m0 = _data_prediction(sde, score_fn, x, t)
    u = (std_m / std_t) * x - a_m * jnp.expm1(-0.5 * h) * m0
    d = _data_prediction(sde, score_fn, u, t_mid)
    return ((std_s / std_t) * x - a_s * jnp.expm1(-h) * d).astype(x.dtype), None

  x, _ = jax.lax.scan(step, x, (times[:-1], times[1:]))
  return _finish(sde, score_fn, x, times[-1], denoise)


# -----------------------------------------------------------------------------
# UniPC (Zhao et al. 2023), data prediction.
# -----------------------------------------------------------------------------


def unipc(sde, score_fn, key, x, times, *, order: int = 2, variant: str = 'bh2',
          lower_order_final: bool = True, denoise: bool = True):
  """UniPC: the UniP-p predictor, then the UniC corrector with the new time's evaluation.

  Step t -> s, p = the step's order. UniP-p: x0 over the step extrapolated from the last p
  predictions (m_t and p - 1 earlier ones), integrated exactly (order p). x0 is then
  evaluated at the predicted x~_s; UniC refits the polynomial through that value as well,
  raising the order to p + 1, and corrects x_s. The evaluation at x~_s is kept as the x0 of
  time s for the next step, so the corrector costs no evaluation; the last step (whose
  evaluation would serve no next step) is not corrected. With a single difference, UniPC
  weights it by B(h) / 2, B(h) = h ('bh1') or 1 - e^{-h} ('bh2'); with more, by the exact
  solve, where B(h) cancels. One evaluation per step. 'bh2' is the default: on the 2-D
  mixture at 10 NFE, 'bh1' overshoots on the large steps of VE and sub-VP (energy distance
  0.059 and 0.142 against 0.0065 and 0.013; benchmarks/sampler_benchmark.py).
  """
  _check_order('unipc', order, (1, 2, 3))
  if variant not in ('bh1', 'bh2'):
    raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {variant!r}")
  del key
  steps = times.shape[0] - 1
  orders = _per_step_order(order, steps, lower_order_final)

  def update(x, m0, diffs, ratios, h, std_ratio, a_s):
    if len(diffs) == 1:
      b = h if variant == 'bh1' else -jnp.expm1(-h)
      base = _polynomial_update(x, m0, [], [], h, std_ratio, a_s)
      return base + batch_broadcast(a_s * 0.5 * b, x) * diffs[0]
    return _polynomial_update(x, m0, diffs, ratios, h, std_ratio, a_s)

  def step(carry, inputs):
    x, m0, ms, lams = carry      # m0: x0 at (x, t), from the previous step's evaluation
    t, s, step_order, is_last = inputs
    _, std_t, lam_t = _coeffs(sde, t)
    a_s, std_s, lam_s = _coeffs(sde, s)
    h = lam_s - lam_t
    std_ratio = std_s / std_t
    ratios = [(lams[k] - lam_t) / h for k in range(order - 1)]
    diffs = [(ms[k] - m0) / ratios[k] for k in range(order - 1)]

    def branch(p):
      def run(_):
        x_pred = update(x, m0, diffs[:p - 1], ratios[:p - 1], h, std_ratio, a_s)

        def corrected(_):
          m_s = _data_prediction(sde, score_fn, x_pred, s)
          one = jnp.ones((), h.dtype)
          x_corr = update(x, m0, diffs[:p - 1] + [m_s - m0], ratios[:p - 1] + [one], h,
                          std_ratio, a_s)
          return x_corr, m_s

        return jax.lax.cond(is_last, lambda _: (x_pred, m0), corrected, None)
      return run

    x_new, m_s = jax.lax.switch(step_order - 1, [branch(p) for p in range(1, order + 1)], None)
    x_new, m_s = x_new.astype(x.dtype), m_s.astype(x.dtype)
    if order > 1:
      ms = jnp.concatenate([m0[None], ms[:-1]])
      lams = jnp.concatenate([lam_t[None], lams[:-1]])
    return (x_new, m_s, ms, lams), None

  m_first = _data_prediction(sde, score_fn, x, times[0])
  hist = max(order - 1, 1)
  init = (x, m_first.astype(x.dtype), jnp.zeros((hist,) + x.shape, x.dtype),
          jnp.zeros((hist,), times.dtype))
  is_last = jnp.arange(steps) == steps - 1
  (x, _, _, _), _ = jax.lax.scan(step, init, (times[:-1], times[1:], orders, is_last))
  return _finish(sde, score_fn, x, times[-1], denoise)


# -----------------------------------------------------------------------------
# The table the factory (sampling.get_sampler) reads.
# -----------------------------------------------------------------------------


class FastSampler(NamedTuple):
  """A solver, the grid it builds by default, fixed options, score evaluations per step."""
  fn: Callable
  default_grid: str
  options: dict
  evals_per_step: int

  def nfe(self, steps: int, denoise: bool) -> int:
    """UniPC counts one evaluation at t_0 plus one per corrected step (all but the last)."""
    return self.evals_per_step * steps + int(denoise)


FAST_SAMPLERS = {
    'ddim': FastSampler(ddim, 'uniform', {}, 1),
    'heun': FastSampler(edm_heun, 'karras', {}, 2),
    'dpm_solver_2m': FastSampler(dpm_solver_multistep, 'quadratic', {'order': 2}, 1),
    'dpm_solver_3m': FastSampler(dpm_solver_multistep, 'quadratic', {'order': 3}, 1),
    'dpm_solver_2s': FastSampler(dpm_solver_2s, 'quadratic', {}, 2),
    'unipc': FastSampler(unipc, 'quadratic', {}, 1),
}
