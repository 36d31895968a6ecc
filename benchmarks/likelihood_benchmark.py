#!/usr/bin/env python
"""Likelihood benchmark: the on-device diffrax solve beside a host-side scipy baseline.

For each problem x SDE x tolerance x divergence it computes log p_eps(x) through the
probability-flow ODE twice:

* ours: ``likelihood.get_likelihood_fn`` with every solver of ``ode_solvers.SOLVERS``
  (the whole solve is one jitted diffrax call on the device);
* baseline: ``scipy.integrate.solve_ivp(method='RK45')`` on the host over the flattened
  state [x, delta_logp], where each evaluation of the vector field is one call of a
  jitted device function and a copy back to numpy: one device round trip per
  evaluation, the method of the reference implementation.

Both use the same rtol = atol, the same eps and the same divergence: either the same
fixed Rademacher probe (drawn from the same key as ``likelihood_fn`` draws it) or the
exact divergence, so only the ODE solver differs. The score is analytic (a Gaussian
mixture), so the exact log-density ``perturbed_log_prob(sde, x, eps)`` is known too.

Problems:
  2d_mixture         1000 points of ``gaussian_mixture.two_dimensional_example()``;
                     Rademacher and exact divergence.
  images_64x32x32x3  64 samples of a diagonal Gaussian over [32, 32, 3] (K=1 by default).
                     Rademacher divergence only. With K=1 the Jacobian of the drift is
                     diagonal, so v^T J v = tr J for a Rademacher v: the estimate is exact
                     and the rows carry a true error against the closed form.

Error control (the second table): the 2-D mixture with exact divergence and the default
solver, every tolerance of ``--ec-tols``, in float32 and float64 (``--ec-dtypes``), with each
error norm of ``ode_solvers.ERROR_NORMS``: 'batch_rms' (the RMS over the whole batch, diffrax's
and scipy's default; the library's norm before per-example control) and 'per_example' (the max
over the batch of each example's RMS, the default). The solves go through ``ode_solvers.solve``
with this file's own exact divergence and traced tolerances (one compilation per SDE x time x
norm), in time t and in log-SNR time lambda = log(a/std) (dx/dlambda = dx/dt dt/dlambda, with
the closed-form inverse t(lambda) of each SDE). At tol 1e-5 each time-t row also runs
``likelihood.get_likelihood_fn`` and records its NFE and max |log p - the row's| as a check.
Recorded: NFE, wall time, and the mean and max over the batch of |log p - exact|
(prior-corrected as below): the max is what per-example control bounds.

Recorded per row: NFE (vector-field evaluations; each one score pass plus a JVP), median
wall time of ``--repeats`` runs after a warm-up run (which includes compilation), the
ratios ours / baseline, and the mean / max of |logp - logp_scipy| (same tolerance),
|logp - logp_scipy@tightest tol|, and |logp - exact|, plus those divided by D.

Usage (from the repository root):
  python benchmarks/likelihood_benchmark.py              # full run, float32
  python benchmarks/likelihood_benchmark.py --quick      # smoke run, seconds
  python benchmarks/likelihood_benchmark.py --x64        # float64 on the device
  python benchmarks/likelihood_benchmark.py --sdes vp --solvers tsit5,bosh3 --tols 1e-3
  python benchmarks/likelihood_benchmark.py --problems none   # the error-control table only
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.special  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

SDE_NAMES = {'vp': 'VPSDE', 've': 'VESDE', 'subvp': 'subVPSDE'}
PROBLEMS = ('2d_mixture', 'images_64x32x32x3')
EPS = 1e-5
AGREEMENT_NATS = 1e-3


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='tiny smoke run: few points, small images, VP only, tsit5, tol 1e-3, 1 repeat')
  p.add_argument('--sdes', default='vp,ve,subvp', help='comma list of vp, ve, subvp')
  p.add_argument('--solvers', default=None,
                 help='comma list of ode_solvers.SOLVERS names (default: all of them)')
  p.add_argument('--tols', default='1e-5,1e-3', help='comma list of rtol = atol values')
  p.add_argument('--problems', default=','.join(PROBLEMS), help='comma list of ' + ', '.join(PROBLEMS))
  p.add_argument('--divergences', default='rademacher,exact',
                 help="comma list; 'exact' is run on the 2-D problem only")
  p.add_argument('--repeats', type=int, default=5, help='timed runs per row (median reported)')
  p.add_argument('--heun-min-tol', type=float, default=1e-5,
                 help='skip heun at tolerances below this (second order: thousands of steps)')
  p.add_argument('--image-components', type=int, default=1, choices=(1, 2),
                 help='mixture components of the image problem (1: Rademacher estimate is exact)')
  p.add_argument('--max-steps', type=int, default=4096, help='max_steps of the diffrax solves')
  p.add_argument('--x64', action='store_true', help='run in float64 (jax_enable_x64)')
  p.add_argument('--ec-dtypes', default='float32,float64',
                 help="dtypes of the error-control table ('' to skip it); float64 runs last")
  p.add_argument('--ec-tols', default=None,
                 help='rtol = atol of the error-control table (default 1e-4,1e-5,1e-6 in float32, '
                      '1e-5,1e-6,1e-7 in float64)')
  p.add_argument('--ec-times', default='t,logsnr',
                 help="time variables of the error-control table: t, logsnr (logsnr in float32 only)")
  p.add_argument('--out', default=None,
                 help='JSON path (default benchmarks/results/likelihood[_x64][_quick].json)')
  return p.parse_args(argv)


def _split(s):
  return [v.strip() for v in s.split(',') if v.strip()]


# -----------------------------------------------------------------------------
# Problems
# -----------------------------------------------------------------------------


def _cast_tree(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      tree)


def make_problem(name, dtype, quick, image_components):
  """Returns (mixture, x): the data distribution and the points to evaluate."""
  import gaussian_mixture
  if name == '2d_mixture':
    mix = gaussian_mixture.two_dimensional_example()
    n = 100 if quick else 1000
  elif name == 'images_64x32x32x3':
    n, h, w, c = (4, 8, 8, 3) if quick else (64, 32, 32, 3)
    i = np.arange(h)[:, None, None] / h
    j = np.arange(w)[None, :, None] / w
    ch = np.arange(c)[None, None, :]
    # A smooth pattern in [-0.8, 0.8] and variances in [0.05, 0.5].
    mean = 0.8 * np.sin(2 * np.pi * (i + 0.5 * j) + ch) * np.cos(np.pi * (j - 0.3 * i))
    var = 0.05 + 0.45 * (0.5 + 0.5 * np.cos(2 * np.pi * (2 * i - j) + 0.7 * ch))
    if image_components == 1:
      weights, means, variances = [1.0], mean[None], var[None]
    else:
      weights = [0.6, 0.4]
      means = np.stack([mean, -0.5 * mean + 0.2])
      variances = np.stack([var, var[::-1]])
    mix = gaussian_mixture.GaussianMixture.from_diag(weights, means, variances)
  else:
    raise ValueError(f'unknown problem {name!r}')
  x = _sample(mix, n, seed=0)
  return _cast_tree(mix, dtype), jnp.asarray(x, dtype)


def _sample(mix, n, seed):
  """n float32 samples of ``mix`` drawn with numpy, so that float32 and --x64 runs
  evaluate the very same points."""
  rng = np.random.default_rng(seed)
  w = np.asarray(mix.weights, np.float64)
  comp = rng.choice(len(w), size=n, p=w / w.sum())
  z = rng.standard_normal((n, mix.dim)) * np.sqrt(np.asarray(mix.eigvals, np.float64)[comp])
  if mix.eigvecs is not None:
    z = np.einsum('nde,ne->nd', np.asarray(mix.eigvecs, np.float64)[comp], z)
  x = np.asarray(mix.means, np.float64)[comp] + z
  return x.reshape((n,) + tuple(mix.event_shape)).astype(np.float32)


def make_sde(name):
  import sde_lib
  return getattr(sde_lib, SDE_NAMES[name])()


def np_mixture_logp(mix, x, a, std):
  """log density of ``mix`` perturbed to mean scale ``a`` and noise ``std`` (scalars),
  in float64 numpy: the reference answer, free of float32 rounding."""
  f64 = np.float64
  w, mu, lam0 = (np.asarray(v, f64) for v in (mix.weights, mix.means, mix.eigvals))
  xf = np.asarray(x, f64).reshape(x.shape[0], -1)
  v = xf[:, None, :] - a * mu[None]                                 # [B, K, D]
  if mix.eigvecs is not None:
    v = np.einsum('bkd,kde->bke', v, np.asarray(mix.eigvecs, f64))
  lam = a**2 * lam0[None] + std**2
  logn = -0.5 * np.sum(np.log(2 * np.pi * lam) + v**2 / lam, axis=-1)
  return scipy.special.logsumexp(np.log(w)[None] + logn, axis=-1)


def np_prior_logp(sde, z):
  zf = np.asarray(z, np.float64).reshape(z.shape[0], -1)
  s = float(sde.prior_std)
  return -0.5 * zf.shape[1] * np.log(2 * np.pi * s**2) - 0.5 * np.sum(zf**2, axis=-1) / s**2


def np_marginal_coeffs(sde, t):
  a, std = sde.marginal_coeffs(jnp.full((1,), t))
  return float(a[0]), float(std[0])


def prior_gap(sde, mix, z):
  """log p_T(z) - log prior(z) (float64): the error of replacing p_T by the prior, which
  the ODE cannot remove. Adding it to a computed logp leaves only the solver's (and the
  arithmetic's) error against the closed form."""
  a, std = np_marginal_coeffs(sde, sde.T)
  return np_mixture_logp(mix, z, a, std) - np_prior_logp(sde, z)


# -----------------------------------------------------------------------------
# The host-side baseline: scipy RK45, one device round trip per evaluation
# -----------------------------------------------------------------------------


def _batch_sum(v):
  return jnp.sum(jnp.reshape(v, (v.shape[0], -1)), axis=-1)


def make_baseline_vector_field(sde, divergence):
  """A jitted ``(t, x, probe, score_fn) -> concat([dx/dt flat, d delta_logp/dt])``.

  Written independently of likelihood.py (only the drift is shared, sde.probability_flow_drift):
  the Hutchinson form is one JVP with the probe as tangent; the exact form is one
  JVP per coordinate with a one-hot tangent.
  """
  @jax.jit
  def vf(t, x, probe, score_fn):
    drift = sde.probability_flow_drift(score_fn)
    f_of = lambda y: drift(t, y)  # noqa: E731
    if divergence == 'exact':
      f = f_of(x)
      d = math.prod(x.shape[1:])
      div = jnp.zeros(x.shape[:1], x.dtype)
      for i in range(d):
        e = jnp.zeros((d,), x.dtype).at[i].set(1.0)
        tangent = jnp.broadcast_to(e.reshape(x.shape[1:]), x.shape)
        jv = jax.jvp(f_of, (x,), (tangent,))[1]
        div = div + jv.reshape(x.shape[0], d)[:, i]
    else:
      f, jv = jax.jvp(f_of, (x,), (probe,))
      div = _batch_sum(jv * probe)
    return jnp.concatenate([f.reshape(-1), div])

  return vf


def baseline_likelihood(sde, vf, score_fn, x, probe, tol, eps=EPS):
  """log p_eps(x) by scipy's RK45 on the host. Returns (logp [batch] float64, z, nfe)."""
  shape, dtype = x.shape, x.dtype
  n = math.prod(shape)

  def fun(t, y):
    xt = jnp.asarray(y[:n].reshape(shape), dtype)             # host -> device
    out = vf(jnp.asarray(t, dtype), xt, probe, score_fn)      # one device call
    return np.asarray(out, np.float64)                        # device -> host (blocks)

  y0 = np.concatenate([np.asarray(x, np.float64).reshape(-1), np.zeros(shape[0])])
  sol = solve_ivp(fun, (eps, sde.T), y0, method='RK45', rtol=tol, atol=tol)
  if not sol.success:
    raise RuntimeError(f'solve_ivp failed: {sol.message}')
  y1 = sol.y[:, -1]
  z = jnp.asarray(y1[:n].reshape(shape), dtype)
  logp = np.asarray(sde.prior_logp(z), np.float64) + y1[n:]
  return logp, z, int(sol.nfev)


# -----------------------------------------------------------------------------
# Timing and statistics
# -----------------------------------------------------------------------------


def timed(fn, repeats):
  """Runs ``fn`` once (warm-up, compilation) and then ``repeats`` times; returns
  (last result, median seconds, all seconds, warm-up seconds)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  warm = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return out, statistics.median(times), times, warm


def _abs_stats(a, b, d):
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return {'mean': float(diff.mean()), 'max': float(diff.max()),
          'mean_per_dim': float(diff.mean() / d), 'max_per_dim': float(diff.max() / d)}


# -----------------------------------------------------------------------------
# The benchmark
# -----------------------------------------------------------------------------


def run_case(problem, sde_name, divergence, tols, solvers, args, dtype, rows):
  import likelihood
  sde = make_sde(sde_name)
  mix, x = make_problem(problem, dtype, args.quick, args.image_components)
  score_fn = mix.score_fn(sde)
  d = math.prod(x.shape[1:])
  t_eps = jnp.full(x.shape[:1], EPS, dtype)
  # The closed form log p_eps(x) in float64 numpy, and the library's (in dtype) beside it.
  exact = np_mixture_logp(mix, x, *np_marginal_coeffs(sde, EPS))
  exact_lib = np.asarray(mix.perturbed_log_prob(sde, x, t_eps), np.float64)
  key = jax.random.PRNGKey(1)
  # The probe likelihood_fn draws from ``key`` (see likelihood._draw_probe).
  probe = (jax.random.rademacher(key, x.shape, dtype) if divergence == 'rademacher'
           else jnp.zeros((), dtype))
  vf = make_baseline_vector_field(sde, divergence)

  base = {'problem': problem, 'sde': sde_name, 'divergence': divergence,
          'batch': int(x.shape[0]), 'dim': int(d), 'dtype': str(jnp.dtype(dtype)),
          'exact_logp_mean': float(exact.mean()),
          'exact_lib_vs_float64_max': float(np.abs(exact_lib - exact).max())}

  def accuracy(logp, z):
    gap = prior_gap(sde, mix, z)
    return {'vs_exact': _abs_stats(logp + gap, exact, d),     # solver + arithmetic error
            'vs_exact_raw': _abs_stats(logp, exact, d),      # plus the prior's error
            'prior_gap_mean_abs': float(np.abs(gap).mean())}

  scipy_logp = {}
  case_rows = []
  for tol in tols:
    # Baseline first: the rows of ours are compared with it.
    (logp_s, z_s, nfe_s), wall_s, times_s, warm_s = timed(
        lambda: baseline_likelihood(sde, vf, score_fn, x, probe, tol), args.repeats)
    scipy_logp[tol] = logp_s
    row_s = dict(base, tol=tol, method='scipy:RK45', nfe=nfe_s, wall_s=wall_s,
                 wall_all_s=times_s, warmup_s=warm_s, logp_mean=float(np.mean(logp_s)),
                 logp=logp_s, **accuracy(logp_s, z_s))
    case_rows.append(row_s)
    _print_row(row_s)
    for solver in solvers:
      row = dict(base, tol=tol, method=f'diffrax:{solver}')
      if solver == 'heun' and tol < args.heun_min_tol:
        row.update(skipped=f'heun below tol {args.heun_min_tol:g} (--heun-min-tol)')
        case_rows.append(row)
        _print_row(row)
        continue
      fn = likelihood.get_likelihood_fn(sde, hutchinson_type=divergence, solver=solver,
                                        rtol=tol, atol=tol, eps=EPS, max_steps=args.max_steps)
      try:
        res, wall, times, warm = timed(lambda: fn(key, score_fn, x), args.repeats)
      except Exception as e:  # e.g. max_steps reached
        row.update(error=f'{type(e).__name__}: {str(e).splitlines()[0][:200]}')
        case_rows.append(row)
        _print_row(row)
        continue
      logp = np.asarray(res.logp, np.float64)
      nfe = int(res.nfe)
      row.update(nfe=nfe, wall_s=wall, wall_all_s=times, warmup_s=warm,
                 logp_mean=float(np.mean(logp)),
                 nfe_ratio=nfe / nfe_s, wall_ratio=wall / wall_s,
                 vs_scipy=_abs_stats(logp, logp_s, d), logp=logp, **accuracy(logp, res.z))
      cheaper = nfe <= nfe_s and wall <= wall_s
      row['agrees_max'] = row['vs_scipy']['max'] <= AGREEMENT_NATS
      row['agrees_mean'] = row['vs_scipy']['mean'] <= AGREEMENT_NATS
      row['done'] = ('yes' if cheaper and row['agrees_max'] else
                     'mean' if cheaper and row['agrees_mean'] else 'no')
      case_rows.append(row)
      _print_row(row)
  # Every row against the baseline at the tightest tolerance (the reference answer).
  tight = min(tols)
  for row in case_rows:
    if 'logp' in row:
      row['vs_scipy_tightest'] = dict(_abs_stats(row['logp'], scipy_logp[tight], d), tol=tight)
  rows.extend(case_rows)


# -----------------------------------------------------------------------------
# Error control: batch RMS vs per-example norm, time t vs log-SNR time
# -----------------------------------------------------------------------------

EC_TARGETS = {'float32': 1e-2, 'float64': 1e-4}   # max error (nats) the tests require
EC_TOLS = {'float32': (1e-4, 1e-5, 1e-6), 'float64': (1e-5, 1e-6, 1e-7)}


def logsnr_of_t(sde, t):
  """lambda(t) = log a(t) - log std(t)."""
  a, std = sde.marginal_coeffs(jnp.reshape(t, (1,)))
  return (jnp.log(a) - jnp.log(std))[0]


def t_of_logsnr(sde_name, sde, lam):
  """The inverse of ``logsnr_of_t``, in closed form per SDE (B = int_0^t beta).

  VE: lambda = -log sigma(t), log sigma linear in t. VP: std^2 / a^2 = e^B - 1, so
  B = log1p(e^{-2 lambda}). Sub-VP: std / a = 2 sinh(B / 2), so B = 2 asinh(e^{-lambda} / 2).
  Then t solves beta_min t + (beta_max - beta_min) t^2 / 2 = B.
  """
  if sde_name == 've':
    return (-lam - jnp.log(sde.sigma_min)) / jnp.log(sde.sigma_max / sde.sigma_min)
  b = jnp.log1p(jnp.exp(-2 * lam)) if sde_name == 'vp' else 2 * jnp.arcsinh(0.5 * jnp.exp(-lam))
  d = sde.beta_max - sde.beta_min
  return 2 * b / (sde.beta_min + jnp.sqrt(sde.beta_min**2 + 2 * d * b))


def _check_inverse(sde_name, sde, dtype):
  """lambda(t(lambda)) = lambda to a few ulps over [eps, T] (the solve's variable is lambda;
  t itself is ill-conditioned near eps for VE in float32, where nothing depends on it)."""
  lam = jax.vmap(lambda u: logsnr_of_t(sde, u))(jnp.asarray(np.geomspace(EPS, 1.0, 50), dtype))
  back = jax.vmap(lambda v: logsnr_of_t(sde, t_of_logsnr(sde_name, sde, v)))(lam)
  worst = float(jnp.max(jnp.abs(back - lam)))
  if worst > (1e-5 if dtype == jnp.float32 else 1e-12):
    raise RuntimeError(f'{sde_name}: lambda(t(lambda)) is off by {worst:.1e}')


def make_time_changed_likelihood(sde_name, sde, vf, time_variable, error_norm):
  """``run(score_fn, x, tol) -> (log p_eps(x), z, nfe)`` solved in ``time_variable``.

  ``time_variable`` is 't' or 'logsnr'. The state is the library's, (x, delta_logp), so
  the error norm sees the same pytree; in log-SNR time both parts of the field are
  multiplied by dt/dlambda. The tolerance is traced: one compilation for all of them.
  """
  import ode_solvers

  if time_variable == 't':
    t_of, s0, s1 = (lambda s: s), EPS, sde.T
  else:
    t_of = lambda s: t_of_logsnr(sde_name, sde, s)  # noqa: E731
    s0, s1 = logsnr_of_t(sde, EPS), logsnr_of_t(sde, sde.T)

  @jax.jit
  def run(score_fn, x, tol):
    n = x.size
    probe = jnp.zeros((), x.dtype)

    def field(s, state):
      t, dt_ds = jax.jvp(t_of, (s,), (jnp.ones_like(s),))
      out = vf(t, state[0], probe, score_fn)
      return out[:n].reshape(x.shape) * dt_ds, out[n:] * dt_ds

    init = (x, jnp.zeros(x.shape[:1], x.dtype))
    (z, delta), nfe = ode_solvers.solve(field, init, jnp.asarray(s0, x.dtype),
                                        jnp.asarray(s1, x.dtype), rtol=tol, atol=tol,
                                        error_norm=error_norm, max_steps=16384)
    return sde.prior_logp(z) + delta, z, nfe

  return run


def run_error_control(sdes, dtype, tols, time_variables, args, rows):
  """One compilation per SDE x time variable x norm (tolerances are traced). The library's
  ``get_likelihood_fn`` is run beside the time-t rows at tol 1e-5 (or the first tol), as a check
  that this code solves the same problem (its NFE and max |log p - this file's log p|)."""
  import likelihood
  import ode_solvers
  dname = str(jnp.dtype(dtype))
  mix, x = make_problem('2d_mixture', dtype, args.quick, args.image_components)
  check_tol = 1e-5 if 1e-5 in tols else tols[0]
  for sde_name in sdes:
    sde = make_sde(sde_name)
    _check_inverse(sde_name, sde, dtype)
    score_fn = mix.score_fn(sde)
    exact = np_mixture_logp(mix, x, *np_marginal_coeffs(sde, EPS))
    vf = make_baseline_vector_field(sde, 'exact')
    nfe_in_t = {}
    for time_variable in sorted(time_variables, key=lambda v: v != 't'):
      for norm in ode_solvers.ERROR_NORMS:
        fn = make_time_changed_likelihood(sde_name, sde, vf, time_variable, norm)
        for tol in tols:
          (logp, z, nfe), wall, _, _ = timed(lambda: fn(score_fn, x, jnp.asarray(tol, dtype)),
                                             min(args.repeats, 3))
          err = _abs_stats(np.asarray(logp, np.float64) + prior_gap(sde, mix, z), exact, 2)
          row = {'dtype': dname, 'sde': sde_name, 'time': time_variable, 'error_norm': norm,
                 'tol': tol, 'batch': int(x.shape[0]), 'nfe': int(nfe), 'wall_s': wall,
                 'err_mean': err['mean'], 'err_max': err['max']}
          if time_variable == 't':
            nfe_in_t[norm, tol] = int(nfe)
            if tol == check_tol:
              lib = likelihood.get_likelihood_fn(sde, hutchinson_type='exact', rtol=tol, atol=tol,
                                                 eps=EPS, error_norm=norm)(
                                                     jax.random.PRNGKey(1), score_fn, x)
              row['library_nfe'] = int(lib.nfe)
              row['library_max_abs_diff'] = float(np.max(np.abs(
                  np.asarray(lib.logp, np.float64) - np.asarray(logp, np.float64))))
          else:
            row['nfe_same_code_t'] = nfe_in_t.get((norm, tol))
          rows.append(row)
          _print_ec_row(row)


_EC_HEADER = (f"{'dtype':<8} {'sde':<6} {'time':<7} {'error norm':<12} {'tol':>6} {'NFE':>5} "
              f"{'NFE in t':>8} {'wall ms':>8} {'|err| mean':>10} {'|err| max':>10} "
              f"{'library NFE, |d logp|':>22}")


def _ec_line(r):
  return (f"{r['dtype']:<8} {r['sde']:<6} {r['time']:<7} {r['error_norm']:<12} {r['tol']:>6.0e} "
          f"{r['nfe']:>5d} {r.get('nfe_same_code_t', '-'):>8} {r['wall_s'] * 1e3:>8.1f} "
          f"{r['err_mean']:>10.1e} {r['err_max']:>10.1e} "
          + (f"{r['library_nfe']:>12d}, {r['library_max_abs_diff']:.0e}" if 'library_nfe' in r else ''))


def _print_ec_row(r):
  print(_ec_line(r), flush=True)


def summarize_error_control(rows):
  """Per dtype x SDE x time x norm: the fewest-NFE tolerance whose max error meets the target."""
  out = []
  groups = {}
  for r in rows:
    groups.setdefault((r['dtype'], r['sde'], r['time'], r['error_norm']), []).append(r)
  for (dname, sde, time_variable, norm), rs in groups.items():
    target = EC_TARGETS[dname]
    good = [r for r in rs if r['err_max'] <= target]
    best = min(good, key=lambda r: r['nfe']) if good else None
    default = next((r for r in rs if r['tol'] == 1e-5), None)
    out.append({'dtype': dname, 'sde': sde, 'time': time_variable, 'error_norm': norm,
                'target_max_nats': target,
                'cheapest': best and {'tol': best['tol'], 'nfe': best['nfe'],
                                      'err_max': best['err_max']},
                'at_1e-5': default and {'nfe': default['nfe'], 'err_max': default['err_max']}})
  return out


def print_error_control(rows, summary):
  print('\nError control: 2-D mixture, 1000 points, exact divergence, dopri5. |err|: against the '
        'float64 closed form\n(prior-corrected), mean and max over the batch. NFE in t: the same '
        'code as the logsnr row, in time t.\nlibrary: likelihood.get_likelihood_fn at the same '
        'settings, its NFE and max |log p - this row\'s|.')
  _print_grouped(rows, _EC_HEADER, _ec_line, ('dtype', 'sde', 'time'))
  print('\nFewest NFE with max error <= target (float32 1e-2, float64 1e-4 nats); at tol 1e-5:')
  for e in summary:
    best, d = e['cheapest'], e['at_1e-5']
    print(f"  {e['dtype']:<8} {e['sde']:<6} {e['time']:<7} {e['error_norm']:<12} " +
          (f"tol {best['tol']:.0e} NFE {best['nfe']:>4d} (max {best['err_max']:.1e})"
           if best else 'none of the tolerances') +
          (f";  at 1e-5: NFE {d['nfe']:>4d} max {d['err_max']:.1e}" if d else ''))


# -----------------------------------------------------------------------------
# Output
# -----------------------------------------------------------------------------

_HEADER = (f"{'problem':<17} {'sde':<5} {'div':<5} {'tol':>5} {'method':<14} {'NFE':>5} "
           f"{'NFE/b':>5} {'wall ms':>8} {'wall/b':>6} {'|d scipy| mean':>14} {'max':>8} "
           f"{'|d sc@tight|max':>15} {'|err| mean':>10} {'max':>8} {'raw max':>8} {'ok':>4}")


def _fmt(v, spec):
  return format(v, spec) if v is not None else '-'


def _row_line(r):
  div = {'rademacher': 'rad', 'exact': 'exact'}[r['divergence']]
  problem = r['problem'].replace('images_64x32x32x3', 'images_64x32x32x3'[:17])
  head = f"{problem:<17} {r['sde']:<5} {div:<5} {r['tol']:>5.0e} {r['method']:<14} "
  if 'skipped' in r or 'error' in r:
    return head + ('skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED: ' + r['error'])
  vs = r.get('vs_scipy', {})
  tight = r.get('vs_scipy_tightest', {})
  return head + (
      f"{r['nfe']:>5d} {_fmt(r.get('nfe_ratio'), '5.2f'):>5} {r['wall_s'] * 1e3:>8.1f} "
      f"{_fmt(r.get('wall_ratio'), '6.2f'):>6} {_fmt(vs.get('mean'), '14.1e'):>14} "
      f"{_fmt(vs.get('max'), '8.1e'):>8} {_fmt(tight.get('max'), '15.1e'):>15} "
      f"{r['vs_exact']['mean']:>10.1e} {r['vs_exact']['max']:>8.1e} "
      f"{r['vs_exact_raw']['max']:>8.1e} {r.get('done', ''):>4}")


def _print_row(r):
  print(_row_line(r), flush=True)


def _print_grouped(rows, header, line, group_keys):
  """A header, a rule, then one line per row, a blank line where group_keys change."""
  print(header)
  print('-' * len(header))
  prev = None
  for r in rows:
    group = tuple(r[k] for k in group_keys)
    if prev is not None and group != prev:
      print()
    prev = group
    print(line(r))


def print_table(rows):
  print()
  _print_grouped(rows, _HEADER, _row_line, ('problem', 'sde', 'divergence'))
  print(f"""
All log-likelihoods in nats; mean / max over the batch. NFE/b, wall/b: ours / scipy RK45 at
the same tol (wall: median of the timed runs after a warm-up run). |d scipy|: |logp -
logp_scipy| at the same tol; |d sc@tight|: against scipy at the tightest tol. |err|: against
the float64 closed form log p_eps(x), after adding log p_T(z) - log prior(z) (the error of
taking p_T to be the prior, which no solver removes); raw max: without that correction. For
div=rad on the 2-D problem |err| is dominated by the Hutchinson estimate's own error; for the
K=1 image problem the Rademacher estimate is exact. ok: 'yes' = within {AGREEMENT_NATS:g} nats
of scipy (max over the batch) with no more NFE and no more wall time; 'mean' = the same with
the mean over the batch; 'no' otherwise.""")


def _has_exact_divergence(row, image_components):
  return row['divergence'] == 'exact' or (row['problem'].startswith('images')
                                          and image_components == 1)


def recommend(rows, image_components):
  """Per problem x SDE x divergence: the fewest-NFE diffrax setting whose error is within
  AGREEMENT_NATS, by the max and by the mean over the batch. The error is against the closed
  form (prior-corrected) where the divergence is exact, else against scipy at the tightest
  tolerance."""
  out = []
  groups = {}
  for r in rows:
    groups.setdefault((r['problem'], r['sde'], r['divergence']), []).append(r)
  for (problem, sde, div), rs in groups.items():
    ref = 'exact' if _has_exact_divergence(rs[0], image_components) else 'scipy_tightest'
    key = 'vs_exact' if ref == 'exact' else 'vs_scipy_tightest'
    entry = {'problem': problem, 'sde': sde, 'divergence': div, 'reference': ref}
    for stat in ('max', 'mean'):
      good = [r for r in rs if 'nfe' in r and r['method'].startswith('diffrax')
              and r[key][stat] <= AGREEMENT_NATS]
      best = min(good, key=lambda r: (r['nfe'], r['wall_s'])) if good else None
      entry[f'by_{stat}'] = best and {'method': best['method'], 'tol': best['tol'],
                                      'nfe': best['nfe'], 'wall_s': best['wall_s'],
                                      'error': best[key][stat]}
    out.append(entry)
  return out


def print_cases(rows):
  print('\nPer case: mean exact log p_eps (nats); mean |log p_T(z) - log prior(z)| (the prior\'s '
        'error, scipy at the tightest tol); max |library closed form in the run dtype - float64|:')
  seen = set()
  for r in rows:
    case = (r['problem'], r['sde'], r['divergence'])
    if case in seen or 'prior_gap_mean_abs' not in r:
      continue
    seen.add(case)
    print(f"  {case[0]:<17} {case[1]:<5} {case[2]:<10} D={r['dim']:<5d} "
          f"log p {r['exact_logp_mean']:>10.3f}  prior gap {r['prior_gap_mean_abs']:.1e}  "
          f"closed form {r['dtype']} err {r['exact_lib_vs_float64_max']:.1e}")


def print_recommendation(rec):
  print(f'\nFewest-NFE diffrax setting within {AGREEMENT_NATS:g} nats (reference: the closed form where the '
        f'divergence is exact, else scipy at the tightest tol):')
  for r in rec:
    parts = []
    for stat in ('max', 'mean'):
      b = r[f'by_{stat}']
      parts.append(f"by {stat}: " + (f"{b['method']} tol {b['tol']:g} NFE {b['nfe']} "
                                     f"(err {b['error']:.1e})" if b else 'none'))
    print(f"  {r['problem']:<17} {r['sde']:<5} {r['divergence']:<10} ref {r['reference']:<14} "
          + ';  '.join(parts))


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return None


def machine_info():
  return {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'platform': platform.platform(), 'processor': platform.processor() or _cpu_model(),
          'machine': platform.machine(), 'python': platform.python_version(),
          'cpu_count': os.cpu_count(), 'jax': jax.__version__,
          'diffrax': __import__('diffrax').__version__, 'scipy': scipy.__version__,
          'numpy': np.__version__, 'devices': [str(dv) for dv in jax.devices()],
          'x64': bool(jax.config.jax_enable_x64),
          'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None}


def main(argv=None):
  args = parse_args(argv)
  if args.x64:
    jax.config.update('jax_enable_x64', True)
  dtype = jnp.float64 if args.x64 else jnp.float32
  import ode_solvers

  if args.quick:
    sdes, solvers, tols, repeats = ['vp'], ['tsit5'], [1e-3], 1
    args.repeats = repeats
    if args.sdes != parse_args([]).sdes:
      sdes = _split(args.sdes)
    if args.solvers is not None:
      solvers = _split(args.solvers)
  else:
    sdes = _split(args.sdes)
    solvers = _split(args.solvers) if args.solvers else list(ode_solvers.SOLVERS)
    tols = [float(t) for t in _split(args.tols)]
  for s in sdes:
    if s not in SDE_NAMES:
      raise SystemExit(f'unknown SDE {s!r}; valid: {sorted(SDE_NAMES)}')
  for s in solvers:
    ode_solvers.get_solver(s)
  problems = [p for p in _split(args.problems) if p != 'none']
  divergences = _split(args.divergences)

  info = machine_info()
  print(f"likelihood benchmark  {info['date']}  jax {info['jax']}  diffrax {info['diffrax']}  "
        f"scipy {info['scipy']}  devices {info['devices']}  cpus {info['cpu_count']}  "
        f"dtype {jnp.dtype(dtype)}  eps {EPS:g}  repeats {args.repeats}", flush=True)
  print(_HEADER, flush=True)

  start = time.perf_counter()
  rows = []
  for problem in problems:
    for sde_name in sdes:
      for div in divergences:
        if div == 'exact' and problem != '2d_mixture':
          continue
        run_case(problem, sde_name, div, tols, solvers, args, dtype, rows)
  main_s = time.perf_counter() - start

  if rows:
    print_table(rows)
    print_cases(rows)
  rec = recommend(rows, args.image_components)
  print_recommendation(rec)

  ec_rows = []
  ec_dtypes = _split(args.ec_dtypes)
  if args.x64:
    ec_dtypes = ['float64'] if 'float64' in ec_dtypes else []
  ec_times = _split(args.ec_times)
  for dname in ec_dtypes:
    if dname not in EC_TOLS:
      raise SystemExit(f'unknown --ec-dtypes entry {dname!r}; valid: {sorted(EC_TOLS)}')
    if dname == 'float64' and not jax.config.jax_enable_x64:
      # Switched once, after every float32 row; nothing compiled in float32 is reused.
      jax.config.update('jax_enable_x64', True)
      jax.clear_caches()
    tols = ([float(t) for t in _split(args.ec_tols)] if args.ec_tols else
            [1e-3] if args.quick else EC_TOLS[dname])
    times = [t for t in ec_times if t == 't' or dname == 'float32']
    print(f'\nerror control, {dname}', flush=True)
    print(_EC_HEADER, flush=True)
    run_error_control(sdes, jnp.dtype(dname), tols, times, args, ec_rows)
  ec_summary = summarize_error_control(ec_rows)
  if ec_rows:
    print_error_control(ec_rows, ec_summary)
  total = time.perf_counter() - start
  print(f'\ntotal {total:.1f} s (main table {main_s:.1f} s, error control {total - main_s:.1f} s)')

  out = args.out or os.path.join(
      ROOT, 'benchmarks', 'results',
      'likelihood' + ('_x64' if args.x64 else '') + ('_quick' if args.quick else '') + '.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  for r in rows:
    r.pop('logp', None)
  payload = {'machine': info, 'settings': {
      'eps': EPS, 'tols': tols, 'solvers': solvers, 'sdes': sdes, 'problems': problems,
      'divergences': divergences, 'repeats': args.repeats, 'quick': args.quick,
      'image_components': args.image_components, 'heun_min_tol': args.heun_min_tol,
      'max_steps': args.max_steps, 'agreement_nats': AGREEMENT_NATS,
      'dtype': str(jnp.dtype(dtype)),
      'ec_dtypes': ec_dtypes, 'ec_times': ec_times, 'ec_targets': EC_TARGETS,
      'error_norm': ode_solvers.DEFAULT_ERROR_NORM},
      'total_s': total, 'main_s': main_s, 'rows': rows, 'recommendation': rec,
      'error_control': ec_rows, 'error_control_summary': ec_summary}
  tmp = out + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, out)
  print(f'wrote {os.path.relpath(out, os.getcwd())}')


if __name__ == '__main__':
  main()
