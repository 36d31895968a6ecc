"""Adaptive ODE solves on the device with diffrax, with exact evaluation counts.

Shared by the probability-flow ODE sampler (sampling.py) and the likelihood
(likelihood.py). The whole batch is one ODE state, so all examples share step
sizes: one solve, and its NFE is the number of vector-field calls for the batch.

Error control. A step from y to y1 with local error estimate e is accepted when
norm(e / (atol + rtol max(|y|, |y1|))) <= 1. diffrax's default norm is the RMS over
the whole state, so one example's error is diluted by the others: with B examples
of n entries each, one example alone may take an error sqrt(B) times its
tolerance, and on the 2-D mixture at 1e-5 one point's log-density ended up 2e-2
nats off while the batch mean was 1e-4. The default norm here, ``per_example``,
is the max over the batch of each example's RMS over all its entries (every leaf
of the state, e.g. x and its accumulated log-density), so a step is accepted
only when every example's own error passes: the batch is then solved to the
tolerance each example would get alone, on the steps of the hardest one.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import optimistix as optx

import sde_lib


class _SolverSpec(NamedTuple):
  cls: type
  evals_per_step: int   # vector-field calls per attempted step (FSAL solvers reuse one)
  evals_at_start: int   # calls before the first step (initial step-size selection)


# Counts measured by counting calls (tests/test_ode_solvers.py checks them).
# Bosh3 is left out: diffrax sometimes makes one call more than this accounting
# (seen at rtol = atol <= 1e-6), so its NFE could not be reported exactly.
SOLVERS = {
    'tsit5': _SolverSpec(diffrax.Tsit5, 6, 1),
    'dopri5': _SolverSpec(diffrax.Dopri5, 6, 1),
    'dopri8': _SolverSpec(diffrax.Dopri8, 13, 1),
    'heun': _SolverSpec(diffrax.Heun, 2, 0),
}
# Chosen from benchmarks/likelihood_benchmark.py: at rtol = atol = 1e-5 with per-example
# control Dopri5 takes the fewest evaluations on the 2-D mixture (127-175; Tsit5 +7-19%,
# Dopri8 +67-85%). scipy's RK45 (the same Dormand-Prince pair, batch RMS) takes 0.71-0.77x
# as many there and lets single points drift by 5e-3 nats; on the image problem NFE are equal.
DEFAULT_SOLVER = 'dopri5'


def get_solver(name: str) -> _SolverSpec:
  try:
    return SOLVERS[name.lower()]
  except KeyError:
    raise ValueError(f'Unknown ODE solver {name!r}; valid names: {sorted(SOLVERS)}') from None


def per_example_rms_norm(tree) -> jax.Array:
  """max_b sqrt(mean of e^2 over every entry of example b): the worst example's RMS.

  Every leaf of ``tree`` is ``[batch, ...]``; example b owns row b of each leaf, so
  its RMS runs over all its entries together (x and, for the likelihood, its
  log-density). A scalar, as diffrax expects. It only sets step sizes, so it
  carries no gradient (diffrax stops the gradient of the accepted error too).
  """
  leaves = jax.tree.leaves(tree)
  sq = sum(sde_lib.sum_except_batch(v**2) for v in leaves)
  size = sum(math.prod(v.shape[1:]) for v in leaves)
  return jax.lax.stop_gradient(jnp.sqrt(jnp.max(sq, initial=0.0) / max(size, 1)))


# name -> norm of the scaled error. 'batch_rms' is diffrax's (and scipy's) default: the
# RMS over the whole batched state, kept to measure what per-example control costs.
ERROR_NORMS = {
    'per_example': per_example_rms_norm,
    'batch_rms': optx.rms_norm,
}
DEFAULT_ERROR_NORM = 'per_example'


def get_error_norm(name: str) -> Callable[[Any], jax.Array]:
  try:
    return ERROR_NORMS[name]
  except KeyError:
    raise ValueError(f'Unknown error_norm {name!r}; valid names: {sorted(ERROR_NORMS)}') from None


def _check_batched(y0):
  """Per-example error control needs every leaf to share a leading batch axis."""
  shapes = [tuple(jnp.shape(v)) for v in jax.tree.leaves(y0)]
  if not shapes or any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
    raise ValueError("error_norm='per_example' needs a state whose leaves are all "
                     f'[batch, ...] with one batch size; got leaf shapes {shapes}')


def solve(vector_field: Callable[[Any, Any], Any], y0, t0: float, t1: float, *,
          solver: str = DEFAULT_SOLVER, rtol: float = 1e-5, atol: float = 1e-5,
          max_steps: int = 4096, error_norm: str = DEFAULT_ERROR_NORM):
  """Integrates dy/dt = vector_field(t, y) from t0 to t1 (either direction).

  Args:
    vector_field: ``(t scalar, y pytree) -> dy/dt`` with the structure of ``y``.
    y0: initial state pytree; for ``error_norm='per_example'`` every leaf is
      ``[batch, ...]``.
    t0, t1: start and end times.
    solver: a name in ``SOLVERS``; adaptive step size from a PID controller.
    rtol, atol: relative and absolute tolerances of the local error estimate; they may
      be traced (one compilation for a sweep of tolerances), and are then not checked.
    max_steps: the solve fails with an error past this many steps.
    error_norm: a name in ``ERROR_NORMS``: 'per_example' (every example within
      tolerance; see the module docstring) or 'batch_rms' (the batch's RMS).

  Returns:
    ``(y1, nfe)``: the state at t1 and the number of vector-field evaluations.
  """
  spec = get_solver(solver)
  norm = get_error_norm(error_norm)
  if not any(isinstance(v, jax.core.Tracer) for v in (rtol, atol)) and not (rtol > 0 and atol > 0):
    raise ValueError(f'rtol and atol must be positive, got rtol={rtol}, atol={atol}')
  if error_norm == 'per_example':
    _check_batched(y0)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), spec.cls(),
      t0=t0, t1=t1, dt0=None, y0=y0,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=norm),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  y1 = _first(sol.ys)
  nfe = spec.evals_at_start + spec.evals_per_step * sol.stats['num_steps']
  return y1, jnp.asarray(nfe, jnp.int32)


def _first(ys):
  return jax.tree.map(lambda y: y[0], ys)
