"""Divergences of batched vector fields: the trace of the Jacobian, exact or estimated.

A field ``f: [batch, ...] -> [batch, ...]`` acts on each example on its own, so its
Jacobian is block diagonal and one JVP with a batched tangent gives every example's
J v at once. Both functions return ``(f(x), div [batch])``: the exact trace with D
JVPs (D = the dimensions of one example; low-dimensional data only), or the
Hutchinson–Skilling estimate v^T J v, unbiased for tr J when E[v v^T] = I
(Rademacher or Gaussian v).

Used by the exact and sliced score-matching losses (tr ds/dx) and by the likelihood
(the divergence of the probability-flow drift).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from sde_lib import sum_except_batch

Field = Callable[[jax.Array], jax.Array]


def exact_divergence(f: Field, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(f(x), tr(df/dx))`` per example, with one JVP per dimension of an example.

  Args:
    f: a per-example field, ``[batch, ...] -> [batch, ...]`` (same shape).
    x: ``[batch, ...]``.

  Returns:
    ``f(x)`` (shape of ``x``) and the exact divergence ``[batch]``.
  """
  batch, d = x.shape[0], math.prod(x.shape[1:])
  fx, jvp = jax.linearize(f, x)
  # Basis vector e_k for every example at once; the k-th JVP's k-th coordinate is J_kk.
  basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
  jvps = jax.vmap(lambda e: jvp(jnp.broadcast_to(e, x.shape)))(basis)
  return fx, jnp.einsum('kbk->b', jvps.reshape(d, batch, d))


def hutchinson_divergence(f: Field, x: jax.Array, probe: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(f(x), v^T (df/dx) v)`` per example for the probe ``v`` (shape of ``x``): one JVP."""
  fx, jv = jax.jvp(f, (x,), (probe,))
  return fx, sum_except_batch(jv * probe)
