"""Turns a network into a score function ``score_fn(x, t)`` for an SDE.

Convention (one for all SDEs here): the network predicts the noise, as in DDPM,
from inputs scaled to unit variance, and

  score(x, t) = -net(c_in(t) x, t) / std(t),  c_in(t) = 1 / sqrt(a(t)^2 sigma_data^2 + std(t)^2),

where p_0t(x_t | x_0) = N(a x_0, std^2 I). For the discrete DDPM chain (the 'ddpm'
loss) a and std are those of level i = t (N - 1): sqrt(abar_i) and sqrt(1 - abar_i).
The paper's architectures and the reference's per-SDE label conventions (needed
to import its checkpoints) come with those architectures.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sde_lib import batch_broadcast


def marginal_for_network(sde, t, discrete_ddpm: bool = False):
  """(a, std) that condition the network at time t."""
  if discrete_ddpm:
    abar = sde.alphas_cumprod[jnp.round(t * (sde.N - 1)).astype(jnp.int32)]
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
  return sde.marginal_coeffs(t)


def network_score(model, sde, params, x, t, *, data_std: float, discrete_ddpm: bool = False,
                  train: bool = False, dropout_key=None):
  """The score of a noise-predicting flax ``model`` called as ``model.apply(params, x, t)``."""
  a, std = marginal_for_network(sde, t, discrete_ddpm)
  c_in = 1.0 / jnp.sqrt(a**2 * data_std**2 + std**2)
  kwargs = {}
  if train:
    kwargs = dict(train=True, rngs={'dropout': dropout_key})
  out = model.apply(params, x * batch_broadcast(c_in, x), t, **kwargs)
  return -out / batch_broadcast(std, x)


@dataclasses.dataclass(frozen=True)
class _NetworkScore:
  """Hashable by its fields, so a score built anew for the same model reuses compiled code."""
  model: Any
  discrete_ddpm: bool

  def __call__(self, sde, params, data_std, x, t):
    return network_score(self.model, sde, params, x, t, data_std=data_std,
                         discrete_ddpm=self.discrete_ddpm)


def get_score_fn(model, sde, params, *, data_std: float, discrete_ddpm: bool = False):
  """An evaluation-mode ``score_fn(x, t)`` with ``sde`` and ``params`` bound as pytree leaves."""
  return jax.tree_util.Partial(_NetworkScore(model, discrete_ddpm), sde, params,
                               jnp.asarray(data_std, jnp.float32))
