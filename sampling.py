"""Samplers for score-based models: Langevin dynamics, predictor-corrector, probability-flow ODE.

Every sampler takes the score as an argument, ``score_fn(x, t) -> score`` with
``t`` a ``[batch]`` array, so an analytic score, a network with bound parameters
or a guided sum plug in alike. Pass it as a pytree (``jax.tree_util.Partial(fn,
params)``): new parameter values then reuse the compiled sampler. Every sampler
returns ``(samples, nfe)``, nfe being the number of score evaluations made.

Predictors and correctors are pure steps with one signature each:

  predictor.update(sde, score_fn, key, x, t, dt, state) -> (x, x_mean, state)
  corrector.update(sde, score_fn, key, x, t) -> (x, x_mean)

``state`` is the predictor's explicit solver state (``predictor.init(x)``; empty
for the one-step methods here), so multistep methods fit the same loop.

Langevin MCMC is one kernel, ``langevin_steps`` (x_mean = x + eps s, x = x_mean +
sqrt(2 eps) z), whatever sets its step eps: the corrector's snr rules and NCSN's
annealed Langevin dynamics (step_lr), related by ``ald_snr_from_step_lr``.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import fast_samplers
import ode_solvers
import sde_lib
from sde_lib import batch_broadcast


# -----------------------------------------------------------------------------
# Predictors: one step of a discretized reverse SDE, from t to t + dt (dt < 0).
# -----------------------------------------------------------------------------


class Predictor(NamedTuple):
  init: Callable[[jax.Array], Any]   # x -> solver state
  update: Callable[..., tuple]       # (sde, score_fn, key, x, t, dt, state) -> (x, x_mean, state)
  nfe: int                           # score evaluations per step


def _no_state(x):
  del x
  return ()


def _euler_maruyama(sde, score_fn, key, x, t, dt, state, probability_flow=False):
  """Euler–Maruyama on the reverse SDE: x_mean = x + f_rev dt, x = x_mean + g sqrt(-dt) z."""
  drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, t)
  x_mean = x + drift * dt
  z = jax.random.normal(key, x.shape, x.dtype)
  x = x_mean + batch_broadcast(diffusion * jnp.sqrt(-dt), x) * z
  return x, x_mean, state


def _reverse_diffusion(sde, score_fn, key, x, t, dt, state, probability_flow=False):
  """Reverse diffusion (eq. 46): x_mean = x - f_rev, x = x_mean + G_rev z."""
  del dt
  f, G = sde.reverse(score_fn, probability_flow).discretize(x, t)
  x_mean = x - f
  z = jax.random.normal(key, x.shape, x.dtype)
  return x_mean + batch_broadcast(G, x) * z, x_mean, state


def _ancestral_sampling(sde, score_fn, key, x, t, dt, state, probability_flow=False):
  """Ancestral sampling (eq. 47): the SDE's own ancestral rule (SMLD, DDPM, or Gaussian posterior)."""
  del dt
  if probability_flow:
    raise ValueError('ancestral_sampling has no probability-flow form; '
                     'use reverse_diffusion or euler_maruyama with probability_flow=True')
  x_mean, noise_std = sde.ancestral_step(x, t, score_fn(x, t))
  z = jax.random.normal(key, x.shape, x.dtype)
  return x_mean + batch_broadcast(noise_std, x) * z, x_mean, state


def _no_predictor(sde, score_fn, key, x, t, dt, state, probability_flow=False):
  """Identity step: no score evaluation."""
  del sde, score_fn, key, t, dt, probability_flow
  return x, x, state


_PREDICTOR_STEPS = {
    'euler_maruyama': (_euler_maruyama, 1),
    'reverse_diffusion': (_reverse_diffusion, 1),
    'ancestral_sampling': (_ancestral_sampling, 1),
    'none': (_no_predictor, 0),
}
PREDICTORS = tuple(_PREDICTOR_STEPS)


def get_predictor(name: str, probability_flow: bool = False) -> Predictor:
  """Looks a predictor up by name; a ValueError lists the valid names."""
  try:
    update, nfe = _PREDICTOR_STEPS[name.lower()]
  except KeyError:
    raise ValueError(f'Unknown predictor {name!r}; valid predictors: {list(PREDICTORS)}') from None
  return Predictor(_no_state, functools.partial(update, probability_flow=probability_flow), nfe)


# -----------------------------------------------------------------------------
# Langevin MCMC: one kernel for the correctors and for NCSN's annealed Langevin dynamics.
# -----------------------------------------------------------------------------


def langevin_steps(step_size_fn, score_fn, key, x, t, n_steps: int):
  """n_steps of Langevin MCMC on score_fn(., t) at fixed t: the one kernel.

  Each step draws z ~ N(0, I) and takes x_mean = x + eps s(x, t), x = x_mean + sqrt(2 eps) z,
  with eps = ``step_size_fn(score, z)`` (a scalar or ``[batch]``). Keys: one per step,
  ``jax.random.split(key, n_steps)``.

  Returns:
    ``(x, x_mean)`` after the last step.
  """

  def body(carry, key):
    x, _ = carry
    score = score_fn(x, t)
    z = jax.random.normal(key, x.shape, x.dtype)
    step = jnp.broadcast_to(step_size_fn(score, z), x.shape[:1])
    x_mean = x + batch_broadcast(step, x) * score
    x = x_mean + batch_broadcast(jnp.sqrt(2 * step), x) * z
    return (x, x_mean), None

  (x, x_mean), _ = jax.lax.scan(body, (x, x), jax.random.split(key, n_steps))
  return x, x_mean


def ald_snr_from_step_lr(step_lr: float, sigma_min: float) -> float:
  """The 'ald' corrector's snr that takes NCSN's annealed Langevin steps: sqrt(step_lr / 2) / sigma_min.

  Both are ``langevin_steps`` at the noise level sigma_i. NCSN (its released code, and
  Algorithm 1 of NCSNv2) steps eps_i = step_lr sigma_i^2 / sigma_L^2, sigma_L = sigma_min;
  the 'ald' corrector (VE: alpha = 1, std = sigma_i) steps eps_i = 2 (snr sigma_i)^2. They
  agree at every level iff step_lr = 2 (snr sigma_min)^2. Example: step_lr 2e-5 and
  sigma_min 0.01 give snr 0.3162, which the reference's NCSN configs round to 0.316.

  Factor 2: NCSN's paper writes its Algorithm 1 as x + (alpha_i / 2) s + sqrt(alpha_i) z,
  alpha_i = epsilon sigma_i^2 / sigma_L^2 with epsilon = 2e-5: in this kernel's form that
  is eps_i = alpha_i / 2, half the step its code takes for step_lr = 2e-5. The code's
  (this) convention is the one NCSN's and NCSNv2's configs and the reference's snr follow.
  """
  if step_lr <= 0 or sigma_min <= 0:
    raise ValueError(f'step_lr and sigma_min must be positive, got step_lr={step_lr}, '
                     f'sigma_min={sigma_min}')
  return math.sqrt(step_lr / 2) / sigma_min


def ald_step_lr_from_snr(snr: float, sigma_min: float) -> float:
  """The inverse of ``ald_snr_from_step_lr``: step_lr = 2 (snr sigma_min)^2."""
  if snr <= 0 or sigma_min <= 0:
    raise ValueError(f'snr and sigma_min must be positive, got snr={snr}, sigma_min={sigma_min}')
  return 2 * (snr * sigma_min)**2


# -----------------------------------------------------------------------------
# Correctors: n_steps of (annealed) Langevin MCMC at fixed t.
# -----------------------------------------------------------------------------


class Corrector(NamedTuple):
  update: Callable[..., tuple]   # (sde, score_fn, key, x, t) -> (x, x_mean)
  nfe: int                       # score evaluations per call (n_steps)


def _snr_step(sde, t, score, z, snr):
  """Algorithm 5 of the SDE paper: eps = 2 alpha (snr ||z|| / ||s||)^2, norms averaged over the batch."""
  grad_norm = jnp.mean(sde_lib.per_example_norm(score))
  noise_norm = jnp.mean(sde_lib.per_example_norm(z))
  return 2 * sde.langevin_alpha(t) * (snr * noise_norm / grad_norm)**2


def _annealed_step(sde, t, score, z, snr):
  """Annealed Langevin (NCSN) step rule in time form: eps = 2 alpha (snr std_t)^2.

  For VE this is NCSN's step_lr rule with step_lr = 2 (snr sigma_min)^2 (``ald_snr_from_step_lr``).
  """
  del score, z
  _, std = sde.marginal_coeffs(t)
  return 2 * sde.langevin_alpha(t) * (snr * std)**2


def _corrector_update(rule, snr, n_steps, sde, score_fn, key, x, t):
  return langevin_steps(functools.partial(rule, sde, t, snr=snr), score_fn, key, x, t, n_steps)


def _no_corrector(sde, score_fn, key, x, t):
  del sde, score_fn, key, t
  return x, x


_CORRECTOR_RULES = {'langevin': _snr_step, 'ald': _annealed_step, 'none': None}
CORRECTORS = tuple(_CORRECTOR_RULES)


def get_corrector(name: str, snr: float = 0.16, n_steps: int = 1) -> Corrector:
  """Looks a corrector up by name; a ValueError lists the valid names.

  'langevin': Algorithm 5 of the SDE paper (step from the snr of score and noise norms).
  'ald': annealed Langevin, step 2 alpha (snr std_t)^2; NCSN's step_lr maps to its snr by
  ``ald_snr_from_step_lr``.
  """
  try:
    rule = _CORRECTOR_RULES[name.lower()]
  except KeyError:
    raise ValueError(f'Unknown corrector {name!r}; valid correctors: {list(CORRECTORS)}') from None
  if rule is None:
    return Corrector(_no_corrector, 0)
  if n_steps < 1:
    raise ValueError(f'n_steps must be at least 1 for corrector {name!r}, got {n_steps}')
  return Corrector(functools.partial(_corrector_update, rule, snr, n_steps), n_steps)


# -----------------------------------------------------------------------------
# Predictor-corrector sampling (Algorithm 1 of the SDE paper).
# -----------------------------------------------------------------------------


def reverse_time_grid(sde: sde_lib.SDE, eps: float):
  """The N times linspace(T, eps, N) at which the reverse chain evaluates the score.

  As in the reference, each of the N steps has dt = -T/N: the chain covers
  [T, 0] and evaluates at t >= eps, which keeps clear of the singular t = 0.
  """
  return jnp.linspace(sde.T, eps, sde.N), -sde.T / sde.N


def pc_update(sde, predictor: Predictor, corrector: Corrector, score_fn, key, x, t, dt, state):
  """One step of Algorithm 1: the corrector at t, then the predictor from t to t + dt.

  Algorithm 1 (SDE paper) writes the predictor first and the corrector after it,
  at the new time; the loop below is the same sequence shifted by half a step
  (corrector at T on the prior sample, then predictor, ...), as the reference
  implementation runs it, so that the last operation is a predictor step whose
  noise-free mean can be returned (``denoise``).
  """
  k_corr, k_pred = jax.random.split(key)
  t_vec = jnp.full(x.shape[:1], t, x.dtype)
  x, _ = corrector.update(sde, score_fn, k_corr, x, t_vec)
  return predictor.update(sde, score_fn, k_pred, x, t_vec, dt, state)


def get_pc_sampler(sde: sde_lib.SDE, shape, predictor: str | Predictor = 'reverse_diffusion',
                   corrector: str | Corrector = 'langevin', snr: float = 0.16,
                   n_steps: int = 1, probability_flow: bool = False, denoise: bool = True,
                   eps: float = 1e-3):
  """Predictor-corrector sampler over ``sde.N`` steps on ``lax.scan``.

  Args:
    sde: the forward SDE.
    shape: the batch shape ``[batch, ...]`` of the samples.
    predictor: a name in ``PREDICTORS`` or a ``Predictor``.
    corrector: a name in ``CORRECTORS`` or a ``Corrector``.
    snr: signal-to-noise ratio of the Langevin corrector's step rule.
    n_steps: corrector steps per time step.
    probability_flow: predict with the probability-flow ODE instead of the reverse SDE.
    denoise: return the noise-free mean of the last predictor step.
    eps: the smallest time evaluated.

  Returns:
    ``sampler(key, score_fn) -> (samples [shape], nfe)``, jit-compiled once per
    score function type (parameters bound as pytree leaves do not recompile).
  """
  if not isinstance(predictor, Predictor):
    predictor = get_predictor(predictor, probability_flow)
  if not isinstance(corrector, Corrector):
    corrector = get_corrector(corrector, snr, n_steps)
  timesteps, dt = reverse_time_grid(sde, eps)
  nfe = sde.N * (predictor.nfe + corrector.nfe)

  @jax.jit
  def _sample(key, score_fn):
    key, k_prior = jax.random.split(key)
    x = sde.prior_sampling(k_prior, shape)

    def body(carry, inputs):
      x, _, state = carry
      t, key = inputs
      return pc_update(sde, predictor, corrector, score_fn, key, x, t, dt, state), None

    init = (x, x, predictor.init(x))
    (x, x_mean, _), _ = jax.lax.scan(body, init, (timesteps, jax.random.split(key, sde.N)))
    return x_mean if denoise else x

  def sampler(key, score_fn):
    return _sample(key, sde_lib.as_pytree(score_fn)), nfe

  return sampler


# -----------------------------------------------------------------------------
# Langevin dynamics (the seed's naive method) and annealed Langevin dynamics (NCSN).
# -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('n_steps',))
def _langevin_dynamics(score_fn, key, x, step_size, n_steps):
  t = jnp.zeros(x.shape[:1], x.dtype)

  def body(x, key):
    z = jax.random.normal(key, x.shape, x.dtype)
    return x + 0.5 * step_size * score_fn(x, t) + jnp.sqrt(step_size) * z, None

  x, _ = jax.lax.scan(body, x, jax.random.split(key, n_steps))
  return x


def langevin_dynamics(score_fn, key, x_init, step_size: float, n_steps: int):
  """Langevin MCMC x <- x + (eps/2) s(x) + sqrt(eps) z for a time-independent score.

  ``score_fn(x, t)`` is called with ``t = 0``. Mixes badly between separated
  modes (the failure that motivates annealing, NCSN section 3).

  Returns ``(samples, nfe)``.
  """
  if step_size <= 0:
    raise ValueError(f'step_size must be positive, got {step_size}')
  return _langevin_dynamics(sde_lib.as_pytree(score_fn), key, x_init, step_size, n_steps), n_steps


def geometric_sigmas(sigma_max: float, sigma_min: float, num_scales: int):
  """NCSN's noise levels sigma_1 > ... > sigma_L: ``sde_lib.geometric_noise_levels``, descending."""
  return sde_lib.geometric_noise_levels(sigma_min, sigma_max, num_scales)[::-1]


@functools.partial(jax.jit, static_argnames=('n_steps_each', 'denoise'))
def _annealed_langevin(score_fn, key, x, sigmas, n_steps_each, step_lr, denoise):
  batch = x.shape[:1]

  def level(x, inputs):
    sigma, key = inputs
    step = step_lr * (sigma / sigmas[-1])**2
    s = jnp.full(batch, sigma, x.dtype)
    x, _ = langevin_steps(lambda score, z: step, score_fn, key, x, s, n_steps_each)
    return x, None

  x, _ = jax.lax.scan(level, x, (sigmas, jax.random.split(key, sigmas.shape[0])))
  if denoise:   # Tweedie's formula at the smallest level (NCSNv2, section 3.2 / appendix)
    s = jnp.full(batch, sigmas[-1], x.dtype)
    x = x + sigmas[-1]**2 * score_fn(x, s)
  return x


def annealed_langevin_dynamics(score_fn, key, x_init, sigmas, n_steps_each: int = 100,
                               step_lr: float = 2e-5, denoise: bool = False):
  """Annealed Langevin dynamics, Algorithm 1 of NCSN (Song & Ermon 2019) as its code runs it.

  For each sigma_i (decreasing), ``n_steps_each`` steps of ``langevin_steps`` on the
  noise-conditional score with eps_i = step_lr sigma_i^2 / sigma_L^2: x_mean = x + eps_i s,
  x = x_mean + sqrt(2 eps_i) z (NCSN's and NCSNv2's code; NCSNv2's Algorithm 1). The 'ald'
  corrector takes the same steps with snr = ``ald_snr_from_step_lr(step_lr, sigma_L)``.
  NCSN's paper prints the update with alpha_i = 2 eps_i (see ``ald_snr_from_step_lr``).

  Args:
    score_fn: ``score_fn(x, sigma)``, conditioned on the noise level ``sigma`` ([batch]).
    key: PRNG key; level i runs on ``jax.random.split(key, L)[i]``.
    x_init: starting points ``[batch, ...]`` (NCSN uses uniform noise).
    sigmas: decreasing noise levels, e.g. ``geometric_sigmas``.
    n_steps_each: Langevin steps per level (T in the paper).
    step_lr: NCSN's step_lr (2e-5 for NCSN; NCSNv2's configs: 6.2e-6 CIFAR-10, 3.3e-6
      CelebA, 1.8e-6 LSUN bedroom).
    denoise: finish with x + sigma_L^2 s(x, sigma_L) (one more evaluation).

  Returns:
    ``(samples, nfe)``.
  """
  sigmas = jnp.asarray(sigmas)
  if step_lr <= 0:
    raise ValueError(f'step_lr must be positive, got {step_lr}')
  if sigmas.ndim != 1 or not bool(jnp.all(jnp.diff(sigmas) < 0)):
    raise ValueError(f'sigmas must be a 1-D decreasing sequence, got shape {sigmas.shape}')
  x = _annealed_langevin(sde_lib.as_pytree(score_fn), key, x_init, sigmas, n_steps_each, step_lr,
                         denoise)
  return x, sigmas.shape[0] * n_steps_each + int(denoise)


# -----------------------------------------------------------------------------
# Probability-flow ODE sampling with diffrax.
# -----------------------------------------------------------------------------


def get_ode_sampler(sde: sde_lib.SDE, shape, *, solver: str = ode_solvers.DEFAULT_SOLVER,
                    rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3,
                    denoise: bool = False, max_steps: int = 4096):
  """Sampler that solves the probability-flow ODE from T to eps on the device.

  Args:
    sde: the forward SDE.
    shape: the batch shape ``[batch, ...]``.
    solver: a name in ``ode_solvers.SOLVERS`` (adaptive steps, PID controller).
    rtol, atol: the solver's tolerances.
    eps: the end time.
    denoise: finish with one noise-free reverse-diffusion step at eps (one more evaluation).
    max_steps: the solve fails past this many steps.

  Returns:
    ``sampler(key, score_fn, z=None) -> (samples, nfe)``; ``z`` is an optional
    latent to decode instead of a prior sample.
  """
  ode_solvers.get_solver(solver)   # fail early on a bad name

  @jax.jit
  def _sample(key, score_fn, z):
    if z is None:
      z = sde.prior_sampling(key, shape)
    x, nfe = ode_solvers.solve(sde.probability_flow_drift(score_fn), z, sde.T, eps,
                               solver=solver, rtol=rtol, atol=atol, max_steps=max_steps)
    if denoise:
      predictor = get_predictor('reverse_diffusion', probability_flow=False)
      t = jnp.full(shape[:1], eps, x.dtype)
      _, x, _ = predictor.update(sde, score_fn, key, x, t, -sde.T / sde.N, ())
      nfe = nfe + 1
    return x, nfe

  def sampler(key, score_fn, z=None):
    if z is not None and tuple(z.shape) != tuple(shape):
      raise ValueError(f'latent z has shape {tuple(z.shape)}, expected {tuple(shape)}')
    return _sample(key, sde_lib.as_pytree(score_fn), z)

  return sampler


# -----------------------------------------------------------------------------
# The factory: every sampler by name.
# -----------------------------------------------------------------------------


def get_fast_sampler(name: str, sde: sde_lib.SDE, shape, *, steps: int = 20, grid=None,
                     eps: float = 1e-3, denoise: bool = True, **options):
  """A few-step ODE solver of ``fast_samplers`` (DDIM, EDM Heun, DPM-Solver++, UniPC).

  Args:
    name: a key of ``fast_samplers.FAST_SAMPLERS``.
    sde: the forward SDE (its marginal coefficients define the solver's variables).
    shape: the batch shape ``[batch, ...]``.
    steps: steps between grid times (ignored when ``grid`` is an array of times).
    grid: a name in ``fast_samplers.GRIDS``, a function ``(sde, steps, eps) -> times`` or
      the times themselves; None takes the sampler's default.
    eps: the last time of a built grid.
    denoise: end with the x0 prediction at the last time (one more evaluation).
    **options: the solver's own options (DDIM ``eta``; Heun ``churn``, ``s_tmin``,
      ``s_tmax``, ``s_noise``; UniPC ``order``, ``variant``; multistep
      ``lower_order_final``).

  Returns:
    ``sampler(key, score_fn) -> (samples, nfe)``.
  """
  spec = fast_samplers.FAST_SAMPLERS[name]
  fixed = sorted(set(options) & set(spec.options))
  if fixed:
    raise ValueError(f'sampler {name!r} fixes {fixed} ({spec.options}); choose another name')
  times = fast_samplers.make_grid(sde, spec.default_grid if grid is None else grid, steps, eps)
  if float(times[0]) != float(jnp.asarray(sde.T, times.dtype)):
    raise ValueError(f'sampler {name!r} starts from the prior at T = {sde.T}: the grid must '
                     f'begin there, got {float(times[0])}')
  kwargs = dict(spec.options, denoise=denoise, **options)
  try:   # a misspelt option fails here, not inside the compiled call
    inspect.signature(spec.fn).bind(sde, None, None, None, times, **kwargs)
  except TypeError as e:
    raise ValueError(f'sampler {name!r}: {e}') from None
  nfe = spec.nfe(times.shape[0] - 1, denoise)

  @jax.jit
  def _sample(key, score_fn):
    x = sde.prior_sampling(key, shape)   # the prior draw of the 'ode' sampler for the same key
    return spec.fn(sde, score_fn, jax.random.fold_in(key, 1), x, times, **kwargs)

  def sampler(key, score_fn):
    return _sample(key, sde_lib.as_pytree(score_fn)), nfe

  return sampler


SAMPLERS = ('pc', 'ode') + tuple(fast_samplers.FAST_SAMPLERS)


def get_sampler(name: str, sde: sde_lib.SDE, shape, **options):
  """Any sampler by name: ``sampler(key, score_fn) -> (samples, nfe)``.

  'pc' (``get_pc_sampler``; ``steps`` sets the SDE's N), 'ode' (``get_ode_sampler``,
  adaptive: no ``steps``) or a few-step solver (``get_fast_sampler``). ``options`` are
  those functions' keyword arguments.
  """
  if name == 'pc':
    steps = options.pop('steps', None)
    if steps is not None:
      if not isinstance(steps, int) or steps < 1:
        raise ValueError(f'steps must be a positive integer, got {steps!r}')
      sde = sde.replace(N=steps)
    return get_pc_sampler(sde, shape, **options)
  if name == 'ode':
    if 'steps' in options:
      raise ValueError("the 'ode' sampler is adaptive (rtol, atol) and takes no steps")
    return get_ode_sampler(sde, shape, **options)
  if name in fast_samplers.FAST_SAMPLERS:
    return get_fast_sampler(name, sde, shape, **options)
  raise ValueError(f'Unknown sampler {name!r}; valid names: {list(SAMPLERS)}')
