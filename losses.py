"""Score-matching objectives for a score function ``score_fn(x, t)``.

Every loss returns a scalar (the mean over the batch) and is differentiable in
whatever ``score_fn`` closes over. Reduction over the data dimensions: 'mean'
averages the squared error over dimensions; 'sum' takes half its sum (the 1/2
of the Fisher divergence), as the reference does.

Continuous-time denoising score matching (eq. 7 of the SDE paper):
  E_t E_x0 E_z [ lambda(t) || s(x_t, t) + z / std(t) ||^2 ],  x_t = a(t) x0 + std(t) z,
with lambda(t) = std(t)^2 (default) or the likelihood weighting lambda(t) = g(t)^2
(Song et al. 2021b, eq. 11: the objective then bounds the KL divergence).

Sliced and exact (Hyvärinen) score matching replace the denoising target by the
implicit objective tr(ds/dx) + ||s||^2 / 2, which equals the 'sum' DSM objective
up to a constant; on perturbed data they use the same t and lambda(t).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import divergence
import sde_lib
from sde_lib import batch_broadcast, sum_except_batch

REDUCTIONS = ('mean', 'sum')
PROJECTIONS = ('rademacher', 'gaussian')


def _reduce_fn(reduce: str):
  if reduce == 'mean':
    return lambda v: jnp.mean(v.reshape(v.shape[0], -1), axis=-1)
  if reduce == 'sum':
    return lambda v: 0.5 * sum_except_batch(v)
  raise ValueError(f'Unknown reduce {reduce!r}; valid: {list(REDUCTIONS)}')


def _dims(x):
  return math.prod(x.shape[1:])


def _sample_time(key, batch, sde, eps):
  if not 0 < eps < sde.T:
    raise ValueError(f'eps must lie in (0, T={sde.T}), got {eps}')
  return jax.random.uniform(key, (batch,), minval=eps, maxval=sde.T)


def _weight(sde, t, std, likelihood_weighting):
  """lambda(t): g(t)^2 with likelihood weighting, std(t)^2 otherwise."""
  if likelihood_weighting:
    return sde.sde(jnp.zeros((t.shape[0], 1)), t)[1]**2
  return std**2


def dsm_loss(score_fn, sde: sde_lib.SDE, key, x, *, eps: float = 1e-5,
             likelihood_weighting: bool = False, reduce: str = 'mean'):
  """Continuous-time denoising score matching, t ~ U(eps, T).

  Per example: lambda(t) || s + z/std ||^2, which for lambda = std^2 is || s std + z ||^2.
  """
  reduce_fn = _reduce_fn(reduce)
  k_t, k_z = jax.random.split(key)
  t = _sample_time(k_t, x.shape[0], sde, eps)
  z = jax.random.normal(k_z, x.shape, x.dtype)
  mean, std = sde.marginal_prob(x, t)
  score = score_fn(mean + batch_broadcast(std, x) * z, t)
  residual = score + z / batch_broadcast(std, x)
  return jnp.mean(_weight(sde, t, std, likelihood_weighting) * reduce_fn(residual**2))


def _discrete_perturbation(key, x, sde):
  """A time t_i = ``sde.discrete_time(i)`` of a uniform noise level i, and z ~ N(0, I).

  t_i is the time whose level (``sde.discrete_index``) is exactly i: the network is
  labelled, and the level's marginal read, through the SDE's grid from t alone.
  """
  k_i, k_z = jax.random.split(key)
  i = jax.random.randint(k_i, (x.shape[0],), 0, sde.N)
  return sde.discrete_time(i), jax.random.normal(k_z, x.shape, x.dtype)


def smld_loss(score_fn, sde: sde_lib.SDE, key, x, *, reduce: str = 'mean'):
  """NCSN's discrete objective over the SMLD noise levels of a VE SDE.

  sigma_i uniform over ``sde.discrete_sigmas``; target -z / sigma_i, weight sigma_i^2:
  || s(x + sigma_i z, t_i) sigma_i + z ||^2, with t_i = i T / (N - 1) so that
  sigma(t_i) = sigma_i (the score function maps t to its noise label).
  """
  if not hasattr(sde, 'discrete_sigmas'):
    raise TypeError(f'smld_loss needs an SDE with SMLD noise levels (VESDE), got {type(sde).__name__}')
  reduce_fn = _reduce_fn(reduce)
  t, z = _discrete_perturbation(key, x, sde)
  _, sigma = sde.discrete_marginal_coeffs(t)
  score = score_fn(x + batch_broadcast(sigma, x) * z, t)
  return jnp.mean(reduce_fn((score * batch_broadcast(sigma, x) + z)**2))


def ddpm_loss(score_fn, sde: sde_lib.SDE, key, x, *, reduce: str = 'mean'):
  """DDPM's epsilon-prediction objective (Ho et al. 2020, eq. 14) over the discrete chain.

  x_i = sqrt(abar_i) x + sqrt(1 - abar_i) z; the predicted noise is
  eps = -sqrt(1 - abar_i) s(x_i, t_i), and the loss || eps - z ||^2.
  """
  if not hasattr(sde, 'alphas_cumprod'):
    raise TypeError(f'ddpm_loss needs an SDE with a DDPM chain (VPSDE), got {type(sde).__name__}')
  reduce_fn = _reduce_fn(reduce)
  t, z = _discrete_perturbation(key, x, sde)
  a, std = sde.discrete_marginal_coeffs(t)
  x_i = batch_broadcast(a, x) * x + batch_broadcast(std, x) * z
  eps_pred = -batch_broadcast(std, x) * score_fn(x_i, t)
  return jnp.mean(reduce_fn((eps_pred - z)**2))


def sliced_score_matching(score_fn, key, x, t, *, n_projections: int = 1,
                          projection: str = 'rademacher', variance_reduction: bool = False):
  """Per-example sliced score matching objective (Song et al. 2019, eq. 8), ``[batch]``.

  v^T (ds/dx) v + (v^T s)^2 / 2 averaged over ``n_projections`` projections v, or
  with ``variance_reduction`` (SSM-VR) the second term replaced by ||s||^2 / 2,
  its expectation for E[v v^T] = I. Both are unbiased for tr(ds/dx) + ||s||^2 / 2.
  """
  if projection not in PROJECTIONS:
    raise ValueError(f'Unknown projection {projection!r}; valid: {list(PROJECTIONS)}')
  if n_projections < 1:
    raise ValueError(f'n_projections must be at least 1, got {n_projections}')
  draw = jax.random.rademacher if projection == 'rademacher' else jax.random.normal
  vs = draw(key, (n_projections,) + x.shape, x.dtype)
  f = lambda y: score_fn(y, t)

  def one(v):
    s, vjv = divergence.hutchinson_divergence(f, x, v)
    second = sum_except_batch(s**2) if variance_reduction else sum_except_batch(v * s)**2
    return vjv + 0.5 * second

  return jnp.mean(jax.vmap(one)(vs), axis=0)


def exact_score_matching(score_fn, x, t):
  """Per-example Hyvärinen objective tr(ds/dx) + ||s||^2 / 2, ``[batch]`` (D JVPs: low dimension)."""
  s, trace = divergence.exact_divergence(lambda y: score_fn(y, t), x)
  return trace + 0.5 * sum_except_batch(s**2)


def _perturbed_implicit_loss(objective, sde, key, x, eps, likelihood_weighting, reduce):
  """lambda(t) * objective(x_t, t) on data perturbed by the SDE; 'mean' divides by D."""
  _reduce_fn(reduce)
  k_t, k_z, k_obj = jax.random.split(key, 3)
  t = _sample_time(k_t, x.shape[0], sde, eps)
  z = jax.random.normal(k_z, x.shape, x.dtype)
  mean, std = sde.marginal_prob(x, t)
  per_example = objective(k_obj, mean + batch_broadcast(std, x) * z, t)
  scale = 1.0 / _dims(x) if reduce == 'mean' else 1.0
  return jnp.mean(_weight(sde, t, std, likelihood_weighting) * per_example) * scale


def ssm_loss(score_fn, sde: sde_lib.SDE, key, x, *, eps: float = 1e-5,
             likelihood_weighting: bool = False, reduce: str = 'mean', n_projections: int = 1,
             projection: str = 'rademacher', variance_reduction: bool = False):
  """Sliced score matching on SDE-perturbed data, t ~ U(eps, T), weighted by lambda(t)."""
  objective = lambda k, xt, t: sliced_score_matching(
      score_fn, k, xt, t, n_projections=n_projections, projection=projection,
      variance_reduction=variance_reduction)
  return _perturbed_implicit_loss(objective, sde, key, x, eps, likelihood_weighting, reduce)


def esm_loss(score_fn, sde: sde_lib.SDE, key, x, *, eps: float = 1e-5,
             likelihood_weighting: bool = False, reduce: str = 'mean'):
  """Exact (Hyvärinen) score matching on SDE-perturbed data, t ~ U(eps, T)."""
  objective = lambda k, xt, t: exact_score_matching(score_fn, xt, t)
  return _perturbed_implicit_loss(objective, sde, key, x, eps, likelihood_weighting, reduce)


# Losses over the N discrete noise levels (the others draw t ~ U(eps, T)).
DISCRETE_LOSSES = ('smld', 'ddpm')

LOSSES = {'dsm': dsm_loss, 'smld': smld_loss, 'ddpm': ddpm_loss, 'ssm': ssm_loss,
          'esm': esm_loss}


def get_loss(name: str):
  """A loss by name; a ValueError lists the valid names."""
  try:
    return LOSSES[name.lower()]
  except KeyError:
    raise ValueError(f'Unknown loss {name!r}; valid losses: {sorted(LOSSES)}') from None
