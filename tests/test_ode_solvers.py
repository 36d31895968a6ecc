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


def test_per_example_norm_is_the_worst_examples_rms():
  x = jnp.array([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]])     # per example: |x|^2 = 25, 1, 2
  logp = jnp.array([0.0, 2.0, 1.0])                        # with log p: 25, 5, 3 over 3 entries
  norm = jax.jit(ode_solvers.per_example_rms_norm)((x, logp))
  assert norm.shape == ()
  np.testing.assert_allclose(norm, np.sqrt(25 / 3), rtol=1e-6)
  # The batch RMS (diffrax's default) averages the worst example away.
  np.testing.assert_allclose(ode_solvers.ERROR_NORMS['batch_rms']((x, logp)), np.sqrt(33 / 9),
                             rtol=1e-6)
  # Images: every entry of an example counts, [batch, H, W, C] beside [batch].
  img = jnp.zeros((2, 4, 4, 3)).at[1].set(2.0)
  np.testing.assert_allclose(ode_solvers.per_example_rms_norm((img, jnp.array([0.0, 2.0]))), 2.0,
                             rtol=1e-6)


def test_batch_is_solved_as_its_hardest_example_alone():
  """dy/dt = k cos(k t) y, y(1) = exp(sin k): one fast example (k = 10) among 999 at rest.

  Per-example control takes the very steps of the fast example solved alone; the batch's
  RMS dilutes its error by sqrt(1000) and leaves it about 100 times less accurate.
  """
  k = jnp.array([10.0] + [0.0] * 999)
  y0 = jnp.ones((1000, 1))
  batch_field = lambda t, y: (k * jnp.cos(k * t))[:, None] * y
  alone_field = lambda t, y: 10.0 * jnp.cos(10.0 * t) * y
  exact = np.exp(np.sin(10.0))
  kwargs = dict(rtol=1e-4, atol=1e-4)
  y_alone, nfe_alone = ode_solvers.solve(alone_field, y0[:1], 0.0, 1.0, **kwargs)
  y_ex, nfe_ex = ode_solvers.solve(batch_field, y0, 0.0, 1.0, error_norm='per_example', **kwargs)
  y_rms, nfe_rms = ode_solvers.solve(batch_field, y0, 0.0, 1.0, error_norm='batch_rms', **kwargs)
  assert int(nfe_ex) == int(nfe_alone)
  np.testing.assert_allclose(y_ex[0], y_alone[0], rtol=1e-6)
  np.testing.assert_array_equal(y_ex[1:], 1.0)
  err_ex, err_rms = abs(float(y_ex[0, 0]) / exact - 1), abs(float(y_rms[0, 0]) / exact - 1)
  assert err_ex < 1e-3
  assert err_rms > 20 * err_ex and int(nfe_rms) < int(nfe_ex)


def test_gradient_through_a_per_example_solve():
  """The norm only picks step sizes: d y(1) / d y(0) of dy/dt = -2 t y is exp(-1)."""
  grad = jax.grad(lambda y0: ode_solvers.solve(lambda t, y: -2 * t * y, y0, 0.0, 1.0)[0].sum())(
      jnp.ones((4, 2)))
  np.testing.assert_allclose(grad, np.full((4, 2), np.exp(-1)), rtol=1e-4)


def test_per_example_norm_needs_a_batched_state():
  field = lambda t, y: y
  with pytest.raises(ValueError, match=r'\[batch, \.\.\.\].*\[\(\)\]'):
    ode_solvers.solve(field, jnp.ones(()), 0.0, 1.0)
  with pytest.raises(ValueError, match=r'one batch size.*\(3, 2\), \(4,\)'):
    ode_solvers.solve(field, (jnp.ones((3, 2)), jnp.ones(4)), 0.0, 1.0)
  y1, _ = ode_solvers.solve(field, jnp.ones(()), 0.0, 1.0, error_norm='batch_rms')
  np.testing.assert_allclose(y1, np.e, rtol=1e-4)
  with pytest.raises(ValueError, match=r"error_norm 'max'.*batch_rms.*per_example"):
    ode_solvers.solve(field, jnp.ones(1), 0.0, 1.0, error_norm='max')
