"""Forward SDEs of score-based generative modeling (Song et al., ICLR 2021).

Each SDE  dx = f(x, t) dt + g(t) dw  is a small frozen pytree: float settings are
leaves, the number of discretization steps ``N`` is static (it fixes loop lengths).
``t`` is always a ``[batch]`` array and ``x`` any ``[batch, ...]`` array.

Equation numbers refer to Song et al. 2021 ("SDE paper"), Song & Ermon 2019
("NCSN") and Ho et al. 2020 ("DDPM").
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def batch_broadcast(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-example ``[batch]`` array to broadcast against ``x``."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def sum_except_batch(x: jax.Array) -> jax.Array:
  """Sums ``[batch, ...]`` over every axis but the first: ``[batch]``."""
  return jnp.sum(jnp.reshape(x, (x.shape[0], -1)), axis=-1)


def per_example_norm(x: jax.Array) -> jax.Array:
  """The Euclidean norm of each example of ``[batch, ...]``: ``[batch]``. Its gradient
  x / ||x|| is taken as 0 where x = 0 (sqrt's derivative is infinite there, and inf * 0
  would turn the whole example into NaN)."""
  squared = sum_except_batch(x**2)
  nonzero = squared > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


def as_pytree(score_fn: ScoreFn) -> jax.tree_util.Partial:
  """A score function as a pytree, so that it passes through ``jax.jit`` as an argument.

  A ``jax.tree_util.Partial`` (parameters bound as leaves) is returned as it is: new
  parameter values then reuse the compiled code. A plain function becomes a leafless
  Partial, hashed by identity.
  """
  if isinstance(score_fn, jax.tree_util.Partial):
    return score_fn
  return jax.tree_util.Partial(score_fn)


def geometric_noise_levels(sigma_min, sigma_max, n: int) -> jax.Array:
  """n noise levels [n], geometric from sigma_min up to sigma_max (ascending).

  The one definition of SMLD's / NCSN's levels: ``VESDE.discrete_sigmas`` is this
  sequence and ``VESDE.descending_sigmas`` (NCSN's label order) its reverse.
  """
  return jnp.exp(jnp.linspace(jnp.log(sigma_min), jnp.log(sigma_max), n))


def _standard_normal_logp(z: jax.Array, std: float | jax.Array) -> jax.Array:
  d = math.prod(z.shape[1:])
  return (-0.5 * d * jnp.log(2 * jnp.pi * std**2)
          - 0.5 * sum_except_batch(z**2) / std**2)


class SDE:
  """Interface shared by all SDEs. Subclasses are ``flax.struct`` dataclasses.

  Subclasses define ``sde``, ``marginal_coeffs``, ``prior_std``, ``discretize``
  and ``ancestral_step``; everything else is derived here, once.

  The discrete grid, defined here and nowhere else: level i of the N discrete noise
  levels sits at t_i = i T / (N - 1) (``discrete_time``); a time's level is
  ``discrete_index`` (truncation). VE and VP add their levels (``discrete_sigmas``,
  ``descending_sigmas``; ``discrete_betas``, ``alphas_cumprod``), a level's marginal
  (``discrete_marginal_coeffs``) and the discrete network label (``discrete_label``:
  VE rounds, VP does not), each as the reference computes it.
  """
  N: int

  @property
  def T(self) -> float:
    return 1.0

  # -- to be defined by each SDE ------------------------------------------
  def sde(self, x, t):
    """Returns ``(drift [batch, ...], diffusion [batch])`` of the forward SDE."""
    raise NotImplementedError

  def marginal_coeffs(self, t):
    """Returns ``(a(t), std(t))``, each ``[batch]``: p_0t(x_t|x_0) = N(a x_0, std^2 I)."""
    raise NotImplementedError

  @property
  def prior_std(self) -> float:
    raise NotImplementedError

  def discretize(self, x, t):
    """Returns ``(f, G)`` of the discrete chain x_{i+1} = x_i + f_i + G_i z_i."""
    raise NotImplementedError

  # -- derived --------------------------------------------------------------
  def marginal_prob(self, x, t):
    """Mean ``[batch, ...]`` and std ``[batch]`` of the perturbation kernel p_0t(x(t)|x(0))."""
    a, std = self.marginal_coeffs(t)
    return batch_broadcast(a, x) * x, std

  def prior_sampling(self, key, shape):
    """Samples the prior p_T, which approximates p_t at t = T."""
    return self.prior_std * jax.random.normal(key, shape)

  def prior_logp(self, z):
    """log p_T(z) per example, ``[batch]``: an isotropic Gaussian of std ``prior_std``."""
    return _standard_normal_logp(z, self.prior_std)

  def _euler_maruyama_discretization(self, x, t):
    """f = drift dt, G = g sqrt(dt) with dt = T / N (the generic fallback)."""
    dt = self.T / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * math.sqrt(dt)

  def level_coordinate(self, t):
    """t (N - 1) / T: the position of time ``t`` on the grid of the N discrete levels.

    Level i sits at t_i = i T / (N - 1). Not rounded: ``discrete_index`` truncates it,
    and VP's discrete network label is this value itself (the reference's t (N - 1)).
    """
    return t * (self.N - 1) / self.T

  def discrete_index(self, t):
    """Index i = int(t (N - 1) / T) of the discrete noise level used at time ``t``.

    The truncation rule, as the reference (``labels.long()``): the one rule for the
    level of a time, used by every discrete chain, loss and network convention here.
    """
    return self.level_coordinate(t).astype(jnp.int32)

  def discrete_time(self, i):
    """A time t_i ~= i T / (N - 1) whose ``discrete_index`` is exactly ``i``.

    In float32, i T / (N - 1) times (N - 1) / T can land just below i, which truncation
    would send one level down (170 of the 1000 levels of N = 1000); t is raised by the
    few ulps that fix it, so discrete losses label level i with a time of level i.
    """
    i = jnp.asarray(i, jnp.int32)
    t = i * (self.T / (self.N - 1))
    for _ in range(4):    # one ulp is enough for N up to 10^6 (tested)
      t = jnp.where(self.discrete_index(t) < i, jnp.nextafter(t, jnp.inf), t)
    return t

  def ancestral_step(self, x, t, score):
    """One ancestral step from the level at ``t`` to the one below.

    Returns ``(x_mean, noise_std [batch])``. The generic rule samples the
    Gaussian posterior q(x_s | x_t, x0_hat) with s = t - T/N and the Tweedie
    estimate x0_hat = (x_t + std_t^2 score) / a_t; VE and VP override it with the
    SMLD and DDPM chains of the reference.
    """
    s = jnp.maximum(t - self.T / self.N, 0.0)
    a_t, std_t = self.marginal_coeffs(t)
    a_s, std_s = self.marginal_coeffs(s)
    a_ts = a_t / a_s                                 # x_t = a_ts x_s + std_ts z
    var_ts = std_t**2 - a_ts**2 * std_s**2
    x0_hat = self.tweedie_mean(x, t, score)
    # Posterior of x_s given x_t and x_0 (both Gaussian): product of the two.
    coef_x0 = a_s * var_ts / std_t**2
    coef_xt = a_ts * std_s**2 / std_t**2
    x_mean = batch_broadcast(coef_x0, x) * x0_hat + batch_broadcast(coef_xt, x) * x
    noise_std = jnp.sqrt(jnp.maximum(var_ts * std_s**2 / std_t**2, 0.0))
    return x_mean, noise_std

  def tweedie_mean(self, x, t, score):
    """E[x_0 | x_t] = (x_t + std^2 score) / a (Tweedie's formula), from the score at (x, t)."""
    a, std = self.marginal_coeffs(t)
    return (x + batch_broadcast(std**2, x) * score) / batch_broadcast(a, x)

  def noise_prediction(self, t, score):
    """The noise eps = -std score that a noise-predicting network (DDPM) outputs."""
    return -batch_broadcast(self.marginal_coeffs(t)[1], score) * score

  def log_snr(self, t):
    """lambda(t) = log(a / std), decreasing in t: the time variable of DDIM, DPM-Solver, UniPC.

    -lambda is log-sigma for VE and EDM's log sigma~ (sigma~ = std / a) for every SDE.
    """
    a, std = self.marginal_coeffs(t)
    return jnp.log(a) - jnp.log(std)

  def time_at_log_snr(self, lam):
    """The time t with ``log_snr(t) = lam`` (closed form per SDE)."""
    raise NotImplementedError

  def langevin_alpha(self, t):
    """Step-size factor alpha_i of the Langevin corrector (1 unless overridden)."""
    return jnp.ones_like(t)

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> 'ReverseSDE':
    """The reverse-time SDE (eq. 6) or, with ``probability_flow``, its ODE (eq. 13)."""
    return ReverseSDE(self, score_fn, probability_flow)

  def probability_flow_drift(self, score_fn: ScoreFn):
    """The probability-flow ODE's vector field ``(t scalar, x) -> dx/dt = f - g^2 s / 2`` (eq. 13).

    In the ``(t, y)`` form ODE solvers take (``ode_solvers.solve``); the sampler and the
    likelihood integrate it in opposite directions.
    """
    reverse = self.reverse(score_fn, probability_flow=True)

    def drift(t, x):
      return reverse.sde(x, jnp.full(x.shape[:1], t, x.dtype))[0]

    return drift


class ReverseSDE:
  """dx = [f - g^2 s] dt + g dw̄ (eq. 6), or dx = [f - g^2 s / 2] dt (eq. 13).

  Not a pytree: it binds a score function. Its ``discretize`` reverses the forward
  discretization (eq. 46): f_rev = f - G^2 s (halved for the ODE), G_rev = G (0 for the ODE).
  """

  def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool):
    self.forward = forward
    self.score_fn = score_fn
    self.probability_flow = probability_flow
    self.N = forward.N
    self.T = forward.T

  def _combine(self, f, g, score):
    w = 0.5 if self.probability_flow else 1.0
    drift = f - batch_broadcast(g**2, score) * score * w
    diffusion = jnp.zeros_like(g) if self.probability_flow else g
    return drift, diffusion

  def sde(self, x, t):
    f, g = self.forward.sde(x, t)
    return self._combine(f, g, self.score_fn(x, t))

  def discretize(self, x, t):
    f, G = self.forward.discretize(x, t)
    return self._combine(f, G, self.score_fn(x, t))


@flax.struct.dataclass
class VESDE(SDE):
  """Variance exploding SDE (eq. 30): dx = sigma(t) sqrt(2 log(sigma_max/sigma_min)) dw.

  sigma(t) = sigma_min (sigma_max / sigma_min)^t. As in the reference, the
  marginal std is sigma(t) itself: data at t = 0 count as already perturbed by
  sigma_min (the exact increment of variance from 0 to t is sigma(t)^2 - sigma_min^2).
  """
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  N: int = flax.struct.field(pytree_node=False, default=1000)

  def sigma(self, t):
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def sde(self, x, t):
    diffusion = self.sigma(t) * jnp.sqrt(2 * jnp.log(self.sigma_max / self.sigma_min))
    return jnp.zeros_like(x), diffusion

  def marginal_coeffs(self, t):
    return jnp.ones_like(t), self.sigma(t)

  def time_at_log_snr(self, lam):
    """sigma = exp(-lambda), t = log(sigma / sigma_min) / log(sigma_max / sigma_min)."""
    return (-lam - jnp.log(self.sigma_min)) / jnp.log(self.sigma_max / self.sigma_min)

  @property
  def prior_std(self):
    return self.sigma_max

  @property
  def discrete_sigmas(self):
    """The N noise levels of SMLD, ascending: sigma_i for level i = ``discrete_index(t)``."""
    return geometric_noise_levels(self.sigma_min, self.sigma_max, self.N)

  @property
  def descending_sigmas(self):
    """The same levels from sigma_max down (NCSN's order): entry l is level N - 1 - l."""
    return self.discrete_sigmas[::-1]

  def discrete_label(self, t):
    """NCSN's integer label of time ``t``: round((T - t)(N - 1) / T), an index into ``descending_sigmas``.

    The rounding rule, as the reference's discrete VE networks are labelled (its
    ``torch.round``); on the sampling grid and at ``discrete_time(i)`` it names the same
    level as ``discrete_index`` (label N - 1 - i). One definition, used by the network
    conventions (models/score.py).
    """
    return jnp.round((self.T - t) * (self.N - 1) / self.T).astype(jnp.int32)

  def discrete_marginal_coeffs(self, t):
    """(a_i, std_i) = (1, sigma_i) of the SMLD level i = ``discrete_index(t)``, each ``[batch]``."""
    return jnp.ones_like(t), self.discrete_sigmas[self.discrete_index(t)]

  def _sigma_and_previous(self, t):
    i = self.discrete_index(t)
    sigmas = self.discrete_sigmas
    prev = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
    return sigmas[i], prev

  def discretize(self, x, t):
    """SMLD chain (eq. 45): f = 0, G = sqrt(sigma_i^2 - sigma_{i-1}^2), sigma_{-1} = 0."""
    sigma, prev = self._sigma_and_previous(t)
    return jnp.zeros_like(x), jnp.sqrt(sigma**2 - prev**2)

  def ancestral_step(self, x, t, score):
    """SMLD ancestral sampling (eq. 47)."""
    sigma, prev = self._sigma_and_previous(t)
    var = sigma**2 - prev**2
    x_mean = x + batch_broadcast(var, x) * score
    return x_mean, jnp.sqrt(prev**2 * var / sigma**2)


class _BetaSchedule(SDE):
  """The linear schedule beta(t) = beta_min + t (beta_max - beta_min) of VP and sub-VP.

  Written once as int_0^t beta; beta itself is its derivative, by autodiff.
  """
  beta_min: float
  beta_max: float
  # The sampling steps that use the discrete chain's betas (named in chain_betas' error).
  _CHAIN_STEPS = 'the Langevin correctors'

  def int_beta(self, t):
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

  def beta(self, t):
    return jax.jvp(self.int_beta, (t,), (jnp.ones_like(t),))[1]

  def time_at_int_beta(self, b):
    """The root t >= 0 of int_0^t beta = b, written to stay exact as b -> 0."""
    return 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min**2
                                               + 2.0 * (self.beta_max - self.beta_min) * b))

  @property
  def discrete_betas(self):
    """DDPM's betas: linspace(beta_min / N, beta_max / N, N)."""
    return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

  @property
  def alphas_cumprod(self):
    """DDPM's abar_i = prod_{j <= i} (1 - beta_j), [N]."""
    return jnp.cumprod(1.0 - self.discrete_betas)

  def discrete_marginal_coeffs(self, t):
    """(sqrt(abar_i), sqrt(1 - abar_i)) of the DDPM level i = ``discrete_index(t)``, each ``[batch]``."""
    abar = self.alphas_cumprod[self.discrete_index(t)]
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

  def chain_betas(self, ancestral: bool = False):
    """``discrete_betas`` for the steps that need them to stay a probability.

    The DDPM chain scales by sqrt(1 - beta_i) (reverse diffusion; ancestral sampling divides
    by it) and the Langevin correctors by alpha_i = 1 - beta_i, so with beta_max / N above 1
    (at 1, for ancestral sampling) samples come out NaN, as the reference's do; such an N
    is refused here, at trace time, naming the fix.
    """
    ratio = self.beta_max / self.N if isinstance(self.beta_max, numbers.Real) else None
    if ratio is not None and (ratio >= 1 if ancestral else ratio > 1):
      steps = 'ancestral sampling' if ancestral else self._CHAIN_STEPS
      bound, need = ('<', f'N > {self.beta_max:g}') if ancestral else ('<=', f'N >= {self.beta_max:g}')
      raise ValueError(
          f'{type(self).__name__} with N={self.N} steps: its discrete chain ({steps}) needs '
          f'beta_max / N {bound} 1, here {self.beta_max:g} / {self.N}; use {need} '
          "(sde.num_scales, or the pc sampler's steps), or a sampler without the chain "
          "(euler_maruyama with corrector 'none', 'ode', a few-step solver)")
    return self.discrete_betas

  def langevin_alpha(self, t):
    return 1.0 - self.chain_betas()[self.discrete_index(t)]

  @property
  def prior_std(self):
    return 1.0


@flax.struct.dataclass
class VPSDE(_BetaSchedule):
  """Variance preserving SDE (eq. 11): dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw."""
  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = flax.struct.field(pytree_node=False, default=1000)
  _CHAIN_STEPS = 'reverse diffusion, the Langevin correctors'

  def sde(self, x, t):
    beta = self.beta(t)
    return -0.5 * batch_broadcast(beta, x) * x, jnp.sqrt(beta)

  def discrete_label(self, t):
    """The DDPM network's label of time ``t``: t (N - 1) / T, not rounded (the reference's)."""
    return self.level_coordinate(t)

  def marginal_coeffs(self, t):
    """a = exp(-B/2), std = sqrt(1 - exp(-B)), B = int_0^t beta (eq. 33); expm1 keeps small t exact."""
    b = self.int_beta(t)
    return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))

  def time_at_log_snr(self, lam):
    """a^2 / std^2 = 1 / (exp(B) - 1) = exp(2 lambda), so B = log(1 + exp(-2 lambda))."""
    return self.time_at_int_beta(jax.nn.softplus(-2.0 * lam))

  def discretize(self, x, t):
    """DDPM chain (eq. 46): f = sqrt(1 - beta_i) x - x, G = sqrt(beta_i)."""
    beta = self.chain_betas()[self.discrete_index(t)]
    f = batch_broadcast(jnp.sqrt(1.0 - beta), x) * x - x
    return f, jnp.sqrt(beta)

  def ancestral_step(self, x, t, score):
    """DDPM ancestral sampling (eq. 47): (x + beta_i s) / sqrt(1 - beta_i), noise sqrt(beta_i)."""
    beta = self.chain_betas(ancestral=True)[self.discrete_index(t)]
    x_mean = (x + batch_broadcast(beta, x) * score) / batch_broadcast(jnp.sqrt(1.0 - beta), x)
    return x_mean, jnp.sqrt(beta)


@flax.struct.dataclass
class subVPSDE(_BetaSchedule):
  """Sub-VP SDE (eq. 17): dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2 B(t)))) dw."""
  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = flax.struct.field(pytree_node=False, default=1000)

  def sde(self, x, t):
    beta = self.beta(t)
    diffusion = jnp.sqrt(beta * -jnp.expm1(-2.0 * self.int_beta(t)))
    return -0.5 * batch_broadcast(beta, x) * x, diffusion

  def marginal_coeffs(self, t):
    """a = exp(-B/2), std = 1 - exp(-B) (eq. 34: the std, no square root)."""
    b = self.int_beta(t)
    return jnp.exp(-0.5 * b), -jnp.expm1(-b)

  def time_at_log_snr(self, lam):
    """std / a = exp(B/2) - exp(-B/2) = 2 sinh(B/2) = exp(-lambda), so B = 2 asinh(exp(-lambda) / 2)."""
    return self.time_at_int_beta(2.0 * jnp.arcsinh(0.5 * jnp.exp(-lam)))

  def discretize(self, x, t):
    """No special chain: Euler–Maruyama with dt = T / N."""
    return self._euler_maruyama_discretization(x, t)


SDES = {'vesde': VESDE, 'vpsde': VPSDE, 'subvpsde': subVPSDE}


def get_sde(name: str, **kwargs) -> SDE:
  """Builds an SDE by name (case-insensitive): one of ``SDES``."""
  try:
    cls = SDES[name.lower()]
  except KeyError:
    raise ValueError(f'Unknown SDE {name!r}; valid names: {sorted(SDES)}') from None
  return cls(**kwargs)


__all__ = ['SDE', 'ReverseSDE', 'VESDE', 'VPSDE', 'subVPSDE', 'SDES', 'get_sde',
           'batch_broadcast', 'sum_except_batch', 'as_pytree', 'geometric_noise_levels']
