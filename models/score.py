"""Turns a network into a score function ``score_fn(x, t)`` for an SDE.

Convention (one for all SDEs here): the network predicts the noise, as in DDPM,
from inputs scaled to unit variance, and

  score(x, t) = -net(c_in(t) x, t) / std(t),  c_in(t) = 1 / sqrt(a(t)^2 sigma_data^2 + std(t)^2),

where p_0t(x_t | x_0) = N(a x_0, std^2 I). For the discrete DDPM chain (the 'ddpm'
loss) a and std are those of level i = sde.discrete_index(t): sqrt(abar_i) and sqrt(1 - abar_i)
(``sde.discrete_marginal_coeffs``).
The paper's architectures (NCSN++, DDPM++, DDPM, NCSN, NCSNv2) instead follow the
reference's per-SDE label and output conventions, so that its checkpoints work:
``reference_network_score`` below, with the table of conventions.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

import sde_lib
from sde_lib import batch_broadcast


def marginal_for_network(sde, t, discrete_ddpm: bool = False):
  """(a, std) that condition the network at time t."""
  if discrete_ddpm:
    return sde.discrete_marginal_coeffs(t)
  return sde.marginal_coeffs(t)


def input_scale(a, std, data_std):
  """c_in = 1 / sqrt(a^2 sigma_data^2 + std^2): x_t scaled to unit variance."""
  return 1.0 / jnp.sqrt(a**2 * data_std**2 + std**2)


def network_score(model, sde, params, x, t, *, data_std: float, discrete_ddpm: bool = False,
                  train: bool = False, dropout_key=None):
  """The score of a noise-predicting flax ``model`` called as ``model.apply(params, x, t)``."""
  a, std = marginal_for_network(sde, t, discrete_ddpm)
  c_in = input_scale(a, std, data_std)
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


# -----------------------------------------------------------------------------
# The paper's architectures (NCSN++, DDPM++, DDPM, NCSN, NCSNv2): the reference's
# conditioning conventions, needed to use its checkpoints. Written down once here.
#
#   SDE     time        label given to the network          network output -> score
#   VE      continuous  sigma(t), the marginal std           the output is the score
#   VE      discrete    sde.discrete_label(t) =               the output is the score
#                       round((T - t)(N - 1)): the index in
#                       sde.descending_sigmas
#   VP      continuous  999 t                                -output / std(t)
#   VP      discrete    sde.discrete_label(t) = t (N - 1)    -output / sqrt(1 - abar_i),
#                                                            i = sde.discrete_index(t)
#   sub-VP  continuous  999 t                                -output / std(t)
#
# VE networks with scale_by_sigma divide their output by the noise level themselves.
# The grid is the SDE's (sde_lib): the level of a time is sde.discrete_index (truncation,
# as the reference's ``labels.long()``); the discrete losses label level i with
# sde.discrete_time(i), which truncates back to i. The VE label rounds, as the reference
# does for VE; both rules are defined once, on the SDE.
# -----------------------------------------------------------------------------


def _ve_convention(sde, t, continuous):
  if continuous:
    return sde.marginal_coeffs(t)[1], None
  return sde.discrete_label(t), None


def _vp_convention(sde, t, continuous):
  if continuous:
    return 999.0 * t, sde.marginal_coeffs(t)[1]
  return sde.discrete_label(t), sde.discrete_marginal_coeffs(t)[1]


def _subvp_convention(sde, t, continuous):
  if not continuous:
    raise ValueError('sub-VP has no discrete-time network convention: train it in continuous time '
                     "(training.loss 'dsm', 'ssm' or 'esm')")
  return 999.0 * t, sde.marginal_coeffs(t)[1]


_CONVENTIONS = {sde_lib.VESDE: _ve_convention, sde_lib.VPSDE: _vp_convention,
                sde_lib.subVPSDE: _subvp_convention}


def reference_labels(sde, t, continuous: bool):
  """The network's label for times ``t`` [batch], and the std that divides its output (or None).

  One entry per SDE type (see the table above); an SDE without one gets a clear error.
  """
  try:
    convention = _CONVENTIONS[type(sde)]
  except KeyError:
    raise ValueError(f'No network convention for {type(sde).__name__}; known: '
                     f'{[c.__name__ for c in _CONVENTIONS]}') from None
  return convention(sde, t, continuous)


def reference_network_score(model, sde, params, x, t, *, continuous: bool, train: bool = False,
                            dropout_key=None):
  """The score of one of the paper's networks, called as ``model.apply(params, x, labels)``."""
  labels, std = reference_labels(sde, t, continuous)
  kwargs = {}
  if train:
    kwargs = dict(train=True, rngs={'dropout': dropout_key})
  out = model.apply(params, x, labels, **kwargs)
  return out if std is None else -out / batch_broadcast(std, x)


@dataclasses.dataclass(frozen=True)
class _ReferenceScore:
  model: Any
  continuous: bool

  def __call__(self, sde, params, x, t):
    return reference_network_score(self.model, sde, params, x, t, continuous=self.continuous)


def get_reference_score_fn(model, sde, params, *, continuous: bool):
  """An evaluation-mode ``score_fn(x, t)`` of a paper network, ``sde`` and ``params`` as leaves."""
  return jax.tree_util.Partial(_ReferenceScore(model, continuous), sde, params)
