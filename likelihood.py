"""Exact log-likelihoods and latent codes through the probability-flow ODE.

With the ODE dx/dt = f~(x, t) = f - g^2 s / 2 (eq. 13 of the SDE paper), the
instantaneous change of variables (eq. 39) gives

  log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt.

Both x and the accumulated divergence are one diffrax state, solved on the
device from eps to T. The error is controlled per example (ode_solvers'
``per_example`` norm: the max over the batch of each example's RMS over its x and
its log-density), so every example's log p is within tolerance, not just the
batch's average. The divergence is exact (D Jacobian-vector products, for
low-dimensional data) or the Hutchinson–Skilling estimate v^T (d f~/dx) v with
one probe v drawn once per solve (Rademacher or Gaussian).

Bits per dimension. For continuous data, ``num_bits=None``: bpd = -log p / (D ln 2)
with no offset. For quantized images, first dequantize uniformly,
y = (k + u) / 2^b in [0, 1) (``uniform_dequantize``), then map to the model's
inputs x = slope y + shift (slope 1 for [0, 1] data, 2 for data centered to
[-1, 1]). The density of y is p_x(x) slope^D and each of the 2^b bins has width
2^-b, so

  bpd = -log p_x(x) / (D ln 2) - log2(slope) + b,

an upper bound on the discrete model's bits/dim: offset 8 for [0, 1] data and
7 for centered data at 8 bits.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

import divergence
import ode_solvers
import sde_lib

HUTCHINSON_TYPES = ('rademacher', 'gaussian', 'exact')


class LikelihoodResult(NamedTuple):
  bpd: jax.Array    # [batch] bits per dimension (with the dequantization offset, if any)
  logp: jax.Array   # [batch] log-density of x at time eps, in nats
  z: jax.Array      # latent code x(T), shape of x
  nfe: jax.Array    # ODE vector-field evaluations: each one score pass with one JVP (D JVPs if exact)


def uniform_dequantize(key, images, num_bits: int = 8):
  """Integer images in [0, 2^b) to (k + u) / 2^b in [0, 1), u ~ U[0, 1)."""
  u = jax.random.uniform(key, images.shape)
  return (images.astype(jnp.float32) + u) / 2**num_bits


def bits_per_dim_offset(num_bits: int | None, scaler_slope: float = 1.0) -> float:
  """The constant added to -log p / (D ln 2): b - log2(slope), or 0 for continuous data."""
  if num_bits is None:
    return 0.0
  if scaler_slope <= 0:
    raise ValueError(f'scaler_slope must be positive, got {scaler_slope}')
  return num_bits - math.log2(scaler_slope)


def _divergence_fn(drift, hutchinson_type):
  """Returns ``div(t, x, probe) -> (drift [x.shape], divergence [batch])`` (divergence.py)."""
  if hutchinson_type == 'exact':
    return lambda t, x, probe: divergence.exact_divergence(lambda y: drift(t, y), x)
  return lambda t, x, probe: divergence.hutchinson_divergence(lambda y: drift(t, y), x, probe)


def _draw_probe(key, x, hutchinson_type):
  if hutchinson_type == 'gaussian':
    return jax.random.normal(key, x.shape, x.dtype)
  if hutchinson_type == 'rademacher':
    return jax.random.rademacher(key, x.shape, x.dtype)
  return jnp.zeros((), x.dtype)


def get_likelihood_fn(sde: sde_lib.SDE, *, hutchinson_type: str = 'rademacher',
                      solver: str = ode_solvers.DEFAULT_SOLVER, rtol: float = 1e-5,
                      atol: float = 1e-5, eps: float = 1e-5, num_bits: int | None = None,
                      scaler_slope: float = 1.0, prior_logp=None, max_steps: int = 4096,
                      error_norm: str = ode_solvers.DEFAULT_ERROR_NORM):
  """Log-likelihood of data under the probability-flow ODE of a score model.

  Args:
    sde: the forward SDE.
    hutchinson_type: 'rademacher' or 'gaussian' (one probe per solve), or 'exact'
      (D JVPs per evaluation; low-dimensional data only).
    solver: a name in ``ode_solvers.SOLVERS``.
    rtol, atol: tolerances of the adaptive solve.
    eps: the start time; the density computed is p_eps, that of data perturbed to eps.
    num_bits: bits per dimension of quantized data (8 for images), or None for
      continuous data. See the module docstring for the offset.
    scaler_slope: slope of the map from [0, 1] intensities to the model's inputs.
    prior_logp: ``z -> [batch]`` log-density at T; the SDE's prior by default.
    max_steps: the solve fails past this many steps.
    error_norm: a name in ``ode_solvers.ERROR_NORMS``; 'per_example' (the default)
      holds every example's [x, log p] to the tolerances, 'batch_rms' only the batch's RMS.

  Returns:
    ``likelihood_fn(key, score_fn, x) -> LikelihoodResult``; ``key`` draws the probe.
  """
  hutchinson_type = hutchinson_type.lower()
  if hutchinson_type not in HUTCHINSON_TYPES:
    raise ValueError(f'Unknown hutchinson_type {hutchinson_type!r}; valid: {list(HUTCHINSON_TYPES)}')
  ode_solvers.get_solver(solver)
  ode_solvers.get_error_norm(error_norm)
  offset = bits_per_dim_offset(num_bits, scaler_slope)
  prior_logp = prior_logp or sde.prior_logp

  @jax.jit
  def _likelihood(key, score_fn, x):
    div = _divergence_fn(sde.probability_flow_drift(score_fn), hutchinson_type)
    probe = _draw_probe(key, x, hutchinson_type)

    def vector_field(t, state):
      return div(t, state[0], probe)

    init = (x, jnp.zeros(x.shape[:1], x.dtype))
    (z, delta_logp), nfe = ode_solvers.solve(vector_field, init, eps, sde.T, solver=solver,
                                             rtol=rtol, atol=atol, max_steps=max_steps,
                                             error_norm=error_norm)
    logp = prior_logp(z) + delta_logp
    d = math.prod(x.shape[1:])
    bpd = -logp / (d * jnp.log(2.0)) + offset
    return LikelihoodResult(bpd, logp, z, nfe)

  def likelihood_fn(key, score_fn, x):
    return _likelihood(key, sde_lib.as_pytree(score_fn), x)

  return likelihood_fn


@functools.partial(jax.jit, static_argnames=('forward', 'eps', 'rtol', 'atol', 'solver',
                                             'max_steps', 'error_norm'))
def _flow(sde, score_fn, x, forward, eps, rtol, atol, solver, max_steps, error_norm):
  t0, t1 = (eps, sde.T) if forward else (sde.T, eps)
  return ode_solvers.solve(sde.probability_flow_drift(score_fn), x, t0, t1, solver=solver,
                           rtol=rtol, atol=atol, max_steps=max_steps, error_norm=error_norm)


def encode(sde: sde_lib.SDE, score_fn, x, *, eps: float = 1e-5, rtol: float = 1e-5,
           atol: float = 1e-5, solver: str = ode_solvers.DEFAULT_SOLVER, max_steps: int = 4096,
           error_norm: str = ode_solvers.DEFAULT_ERROR_NORM):
  """Latent code z = x(T) of data x = x(eps) through the probability-flow ODE. Returns (z, nfe).

  The options are those of ``get_likelihood_fn``; every example's z is held to the
  tolerances with the default ``error_norm``.
  """
  return _flow(sde, sde_lib.as_pytree(score_fn), x, True, eps, rtol, atol, solver, max_steps,
               error_norm)


def decode(sde: sde_lib.SDE, score_fn, z, *, eps: float = 1e-5, rtol: float = 1e-5,
           atol: float = 1e-5, solver: str = ode_solvers.DEFAULT_SOLVER, max_steps: int = 4096,
           error_norm: str = ode_solvers.DEFAULT_ERROR_NORM):
  """Data x(eps) of a latent code z = x(T): the inverse of ``encode``. Returns (x, nfe)."""
  return _flow(sde, sde_lib.as_pytree(score_fn), z, False, eps, rtol, atol, solver, max_steps,
               error_norm)
