"""Gaussian mixtures: closed-form densities and scores of data perturbed by any SDE.

If x_0 ~ sum_k w_k N(mu_k, Sigma_k) and the SDE's kernel is p_0t(x_t|x_0) =
N(a(t) x_0, std(t)^2 I), then x_t ~ sum_k w_k N(a mu_k, a^2 Sigma_k + std^2 I).
With Sigma_k = U_k diag(lam_k) U_k^T this stays diagonal in the basis U_k, so the
perturbed log-density and score cost one rotation per component. This is the
ground truth every sampler, loss and likelihood is checked against.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import sde_lib


@flax.struct.dataclass
class GaussianMixture:
  """Mixture of K Gaussians in D dimensions; data arrays are ``[batch, ...]``.

  Attributes:
    weights: [K] mixture weights, summing to one.
    means: [K, D].
    eigvals: [K, D] covariance eigenvalues.
    eigvecs: [K, D, D] eigenvectors as columns, or None for diagonal covariances.
    event_shape: the shape of one example (static), e.g. (2,) or (32, 32, 3).
  """
  weights: jax.Array
  means: jax.Array
  eigvals: jax.Array
  eigvecs: jax.Array | None
  event_shape: tuple = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def from_covs(cls, weights, means, covs):
    """Full covariances ``[K, D, D]`` (low dimension)."""
    covs = np.asarray(covs, np.float64)
    lam, u = np.linalg.eigh(covs)
    lam = np.maximum(lam, 0.0)     # a singular covariance's round-off
    means = np.asarray(means)
    return cls(jnp.asarray(weights, jnp.float32), jnp.asarray(means, jnp.float32),
               jnp.asarray(lam, jnp.float32), jnp.asarray(u, jnp.float32),
               event_shape=(means.shape[-1],))

  @classmethod
  def from_diag(cls, weights, means, variances, event_shape=None):
    """Diagonal covariances: ``means`` and ``variances`` are [K, *event_shape]."""
    means = jnp.asarray(means, jnp.float32)
    event_shape = tuple(event_shape or means.shape[1:])
    k = means.shape[0]
    return cls(jnp.asarray(weights, jnp.float32), means.reshape(k, -1),
               jnp.asarray(variances, jnp.float32).reshape(k, -1), None,
               event_shape=event_shape)

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def covs(self):
    if self.eigvecs is None:
      return jax.vmap(jnp.diag)(self.eigvals)
    return jnp.einsum('kij,kj,klj->kil', self.eigvecs, self.eigvals, self.eigvecs)

  def _rotate(self, v):
    """[B, K, D] coordinates of v = x - mean in each component's eigenbasis."""
    if self.eigvecs is None:
      return v
    return jnp.einsum('bkd,kde->bke', v, self.eigvecs)

  def _unrotate(self, w):
    if self.eigvecs is None:
      return w
    return jnp.einsum('bke,kde->bkd', w, self.eigvecs)

  def _component_terms(self, x, a, std):
    """log w_k + log N_k(x) [B, K] and the whitened residuals of the perturbed mixture."""
    xf = x.reshape(x.shape[0], -1)
    lam = a[:, None, None]**2 * self.eigvals[None] + std[:, None, None]**2   # [B, K, D]
    v = self._rotate(xf[:, None, :] - a[:, None, None] * self.means[None])   # [B, K, D]
    logn = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * lam) + v**2 / lam, axis=-1)
    return jnp.log(self.weights)[None] + logn, v, lam

  def log_prob_at(self, x, a, std):
    """log density of the mixture perturbed to mean scale ``a`` and noise ``std`` ([batch])."""
    terms, _, _ = self._component_terms(x, a, std)
    return jax.scipy.special.logsumexp(terms, axis=-1)

  def score_at(self, x, a, std):
    terms, v, lam = self._component_terms(x, a, std)
    resp = jax.nn.softmax(terms, axis=-1)                                    # [B, K]
    grad = -self._unrotate(v / lam)                                          # [B, K, D]
    return jnp.einsum('bk,bkd->bd', resp, grad).reshape(x.shape)

  def log_prob(self, x):
    """log p_0(x), ``[batch]``."""
    zeros = jnp.zeros(x.shape[:1], x.dtype)
    return self.log_prob_at(x, zeros + 1, zeros)

  def perturbed_log_prob(self, sde: sde_lib.SDE, x, t):
    """log p_t(x) under ``sde``, ``[batch]``."""
    a, std = sde.marginal_coeffs(t)
    return self.log_prob_at(x, a, std)

  def perturbed_score(self, sde: sde_lib.SDE, x, t):
    """grad_x log p_t(x) under ``sde``: the exact score, shape of ``x``."""
    a, std = sde.marginal_coeffs(t)
    return self.score_at(x, a, std)

  def score_fn(self, sde: sde_lib.SDE):
    """The exact score as a jit-friendly ``score_fn(x, t)`` pytree (no recompilation per mixture)."""
    return jax.tree_util.Partial(_perturbed_score, self, sde)

  def sample(self, key, n: int):
    """n samples, ``[n, *event_shape]``."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.choice(k_comp, self.weights.shape[0], (n,), p=self.weights)
    z = jax.random.normal(k_noise, (n, self.dim)) * jnp.sqrt(self.eigvals[comp])
    if self.eigvecs is not None:
      z = jnp.einsum('nde,ne->nd', self.eigvecs[comp], z)
    return (self.means[comp] + z).reshape((n,) + self.event_shape)

  def component_log_posterior(self, sde: sde_lib.SDE, x, t):
    """log p_t(k | x) ``[batch, K]``: the exact class posterior of the perturbed mixture."""
    a, std = sde.marginal_coeffs(t)
    terms, _, _ = self._component_terms(x, a, std)
    return jax.nn.log_softmax(terms, axis=-1)

  def component(self, k: int) -> 'GaussianMixture':
    """Component k alone, as a one-component mixture."""
    eigvecs = None if self.eigvecs is None else self.eigvecs[k:k + 1]
    return GaussianMixture(jnp.ones((1,), jnp.float32), self.means[k:k + 1],
                           self.eigvals[k:k + 1], eigvecs, event_shape=self.event_shape)

  def posterior(self, matrix, y, noise_std=0.0) -> 'GaussianMixture':
    """The exact posterior of x given y = A x + noise_std z, one measurement y [m].

    A mixture again: component k becomes N(mu_k + K_k (y - A mu_k), Sigma_k - K_k A Sigma_k)
    with K_k = Sigma_k A^T S_k^-1, S_k = A Sigma_k A^T + noise_std^2 I, and its weight is
    reweighted by N(y; A mu_k, S_k). Computed in float64 on the host (a test reference).
    """
    a = np.asarray(matrix, np.float64)
    y = np.asarray(y, np.float64).reshape(-1)
    covs = np.asarray(self.covs, np.float64)
    means = np.asarray(self.means, np.float64)
    new_means, new_covs, logw = [], [], []
    for k in range(means.shape[0]):
      s = a @ covs[k] @ a.T + noise_std**2 * np.eye(a.shape[0])
      gain = np.linalg.solve(s, a @ covs[k]).T
      r = y - a @ means[k]
      new_means.append(means[k] + gain @ r)
      cov = covs[k] - gain @ a @ covs[k]
      new_covs.append((cov + cov.T) / 2)
      _, logdet = np.linalg.slogdet(2 * np.pi * s)
      logw.append(np.log(float(self.weights[k])) - 0.5 * (logdet + r @ np.linalg.solve(s, r)))
    logw = np.asarray(logw)
    w = np.exp(logw - logw.max())
    return GaussianMixture.from_covs(w / w.sum(), np.stack(new_means), np.stack(new_covs))

  def assign(self, x):
    """Index of the most responsible component of each example of the clean mixture."""
    zeros = jnp.zeros(x.shape[:1], x.dtype)
    terms, _, _ = self._component_terms(x, zeros + 1, zeros)
    return jnp.argmax(terms, axis=-1)


def _perturbed_score(mixture, sde, x, t):
  return mixture.perturbed_score(sde, x, t)


def two_dimensional_example() -> GaussianMixture:
  """A 3-mode 2-D mixture with unequal weights and correlated covariances (used in tests)."""
  weights = [0.5, 0.3, 0.2]
  means = [[-2.0, 0.0], [2.0, 1.5], [1.0, -2.5]]
  covs = [[[0.30, 0.10], [0.10, 0.20]],
          [[0.15, -0.05], [-0.05, 0.25]],
          [[0.20, 0.0], [0.0, 0.10]]]
  return GaussianMixture.from_covs(weights, means, covs)
