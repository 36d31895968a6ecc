"""divergence.py: the exact Jacobian trace and Hutchinson's estimator, against jax.jacfwd."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

import divergence


def _field(x):
  """A nonlinear per-example field on [batch, 2, 2] (mixes an example's entries, never examples)."""
  w = jnp.array([[0.5, -1.0, 0.3, 0.0], [0.2, 0.1, -0.7, 0.4], [1.1, 0.0, 0.2, -0.3],
                 [0.0, 0.6, 0.5, 0.9]])
  flat = x.reshape(x.shape[0], 4)
  return (jnp.tanh(flat @ w) * flat[:, ::-1]).reshape(x.shape)


def _jacobian_traces(x):
  one = lambda v: _field(v[None])[0].reshape(4)
  jac = jax.vmap(jax.jacfwd(one))(x)   # [batch, 4, 2, 2]
  return np.trace(np.asarray(jac).reshape(x.shape[0], 4, 4), axis1=1, axis2=2)


def test_exact_divergence_is_the_jacobian_trace():
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 2))
  fx, div = divergence.exact_divergence(_field, x)
  np.testing.assert_allclose(np.asarray(fx), np.asarray(_field(x)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(div), _jacobian_traces(x), rtol=1e-5, atol=1e-6)


def test_hutchinson_over_every_sign_vector_is_exact():
  """E[v^T J v] = tr J for Rademacher v: the mean over all 2^D sign vectors is the trace exactly."""
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 2))
  estimates = []
  for signs in itertools.product([-1.0, 1.0], repeat=4):
    probe = jnp.broadcast_to(jnp.array(signs).reshape(1, 2, 2), x.shape)
    fx, est = divergence.hutchinson_divergence(_field, x, probe)
    estimates.append(np.asarray(est))
  np.testing.assert_allclose(np.asarray(fx), np.asarray(_field(x)), rtol=1e-6)
  np.testing.assert_allclose(np.mean(estimates, axis=0), _jacobian_traces(x), rtol=1e-5, atol=1e-6)
  # One probe alone is not the trace (the test above would pass a constant otherwise).
  assert np.abs(estimates[0] - _jacobian_traces(x)).max() > 1e-2
