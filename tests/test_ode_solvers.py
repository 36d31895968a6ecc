"""diffrax solves: convergence and the evaluation counts reported as NFE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ode_solvers


@pytest.mark.parametrize('solver', sorted(ode_solvers.SOLVERS))
@pytest.mark.parametrize('tol', [1e-3, 1e-5, 1e-7])
def test_nfe_equals_counted_calls(solver, tol):
  count = [0]

  def vector_field(t, y):
    jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
    return -y * (1 + jnp.sin(5 * t)) + jnp.cos(20 * t)

  y1, nfe = jax.jit(lambda y0: ode_solvers.solve(vector_field, y0, 1.0, 0.0, solver=solver,
                                                 rtol=tol, atol=tol, max_steps=100_000))(jnp.ones(3))
  jax.block_until_ready(y1)
  jax.effects_barrier()
  assert count[0] == int(nfe)


@pytest.mark.parametrize('solver', ['tsit5', 'dopri5', 'dopri8'])
def test_linear_ode_exact_solution(solver, x64):
  """dy/dt = -2 t y has y(1) = y(0) exp(-1); backwards in time too."""
  field = lambda t, y: -2 * t * y
  y1, _ = ode_solvers.solve(field, jnp.array([1.0, 3.0]), 0.0, 1.0, solver=solver, rtol=1e-9, atol=1e-9, max_steps=100_000)
  np.testing.assert_allclose(y1, np.array([1.0, 3.0]) * np.exp(-1), rtol=1e-7)
  y0, _ = ode_solvers.solve(field, y1, 1.0, 0.0, solver=solver, rtol=1e-9, atol=1e-9, max_steps=100_000)
  np.testing.assert_allclose(y0, [1.0, 3.0], rtol=1e-7)


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"'rk4'.*dopri5"):
    ode_solvers.solve(lambda t, y: y, jnp.ones(1), 0.0, 1.0, solver='rk4')
  with pytest.raises(ValueError, match='rtol'):
    ode_solvers.solve(lambda t, y: y, jnp.ones(1), 0.0, 1.0, rtol=0.0)
