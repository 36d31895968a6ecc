"""Per-image normalizations of the NCSN family (Song & Ermon 2019, 2020).

InstanceNorm++ (Song & Ermon 2019, eq. 9 in the appendix of "Generative Modeling by
Estimating Gradients of the Data Distribution") normalizes each channel of each
image over its H x W pixels, then adds back the channel means, standardized across
the channels of that image and scaled by alpha, so that the colour shift that plain
instance normalization removes is kept:

  mu_k = mean_{h,w} x_k,  s_k^2 = var_{h,w} x_k,
  m, v = mean and unbiased variance of (mu_1, ..., mu_C),
  z_k = gamma_k ((x_k - mu_k) / sqrt(s_k^2 + eps) + alpha_k (mu_k - m) / sqrt(v + eps)) + beta_k.

The conditional versions take gamma, alpha, beta from an embedding of the integer
noise level. Variances follow the reference PyTorch code (and hence its
checkpoints): biased over pixels for the instance statistics, unbiased across
channel means and in VarianceNorm (the JAX reference uses biased variances
throughout). Every op acts per example. All modules take NHWC inputs.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

_EPS = 1e-5


def _near_one(key, shape, dtype=jnp.float32):
  """N(1, 0.02^2), the reference's initial scale."""
  return 1.0 + 0.02 * nn.initializers.normal(1.0)(key, shape, dtype)


def _instance_standardize(x):
  """(x - mu) / sqrt(s^2 + eps) per image and channel, with its means mu [B, C]."""
  mu = jnp.mean(x, axis=(1, 2))
  var = jnp.var(x, axis=(1, 2))
  return (x - mu[:, None, None, :]) / jnp.sqrt(var[:, None, None, :] + _EPS), mu


def _standardized_means(mu):
  """(mu - m) / sqrt(v + eps) across the C channel means of each image (v unbiased)."""
  m = jnp.mean(mu, axis=-1, keepdims=True)
  v = jnp.var(mu, axis=-1, keepdims=True, ddof=1)
  return (mu - m) / jnp.sqrt(v + _EPS)


def _per_channel(p):
  """[B, C] or [C] -> [B or 1, 1, 1, C], broadcastable against [B, H, W, C]."""
  return p[:, None, None, :] if p.ndim == 2 else p[None, None, None, :]


def _instance_norm_plus(x, gamma, alpha, beta):
  h, mu = _instance_standardize(x)
  h = h + _per_channel(alpha) * _standardized_means(mu)[:, None, None, :]
  h = _per_channel(gamma) * h
  return h if beta is None else h + _per_channel(beta)


def _variance_normalize(x):
  """x / sqrt(unbiased var over pixels + eps), no centering (the reference's VarianceNorm)."""
  var = jnp.var(x, axis=(1, 2), keepdims=True, ddof=1)
  return x / jnp.sqrt(var + _EPS)


class InstanceNormPlus(nn.Module):
  """InstanceNorm++ with learned alpha, gamma ~ N(1, 0.02^2) and beta = 0, each [C].

  Attributes:
    use_bias: learn beta (the reference always does).
  """
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    alpha = self.param('alpha', _near_one, (c,))
    gamma = self.param('gamma', _near_one, (c,))
    beta = self.param('beta', nn.initializers.zeros, (c,)) if self.use_bias else None
    return _instance_norm_plus(x, gamma, alpha, beta)


class InstanceNorm(nn.Module):
  """Plain instance normalization with an affine map (weight = 1, bias = 0 at init).

  The JAX reference learns this affine map; the PyTorch one (nn.InstanceNorm2d,
  affine=False) does not.
  """
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h, _ = _instance_standardize(x)
    h = h * _per_channel(self.param('weight', nn.initializers.ones, (c,)))
    return h + _per_channel(self.param('bias', nn.initializers.zeros, (c,))) if self.use_bias else h


class VarianceNorm(nn.Module):
  """Divides each channel by its standard deviation over pixels; learned alpha [C] ~ N(1, 0.02^2)."""

  @nn.compact
  def __call__(self, x):
    return _variance_normalize(x) * _per_channel(self.param('alpha', _near_one, (x.shape[-1],)))


class GroupNorm(nn.Module):
  """GroupNorm with min(C // 4, 32) groups, lowered until it divides C."""
  max_groups: int = 32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    groups = max(1, min(c // 4, self.max_groups))
    while c % groups:
      groups -= 1
    return nn.GroupNorm(num_groups=groups, epsilon=_EPS, name='norm')(x)


def _conditional_embed(num_classes, features, num_near_one):
  """nn.Embed [num_classes, features]: first num_near_one columns ~ N(1, 0.02^2), rest 0."""

  def init(key, shape, dtype=jnp.float32):
    scale = _near_one(key, (shape[0], num_near_one), dtype)
    return jnp.concatenate([scale, jnp.zeros((shape[0], shape[1] - num_near_one), dtype)], axis=-1)

  return nn.Embed(num_embeddings=num_classes, features=features, embedding_init=init, name='embed')


class ConditionalInstanceNormPlus(nn.Module):
  """InstanceNorm++ whose gamma, alpha, beta are rows of an embedding of the label.

  The embedding is [num_classes, 3C] laid out as (gamma, alpha, beta), like the
  reference's nn.Embedding; gamma and alpha start at N(1, 0.02^2), beta at 0.

  Attributes:
    num_classes: number of noise levels (labels are integers in [0, num_classes)).
    use_bias: learn beta (then the embedding has 3C columns, else 2C).
  """
  num_classes: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, y):
    c = x.shape[-1]
    parts = 3 if self.use_bias else 2
    params = _conditional_embed(self.num_classes, parts * c, 2 * c)(y)
    gamma, alpha = params[:, :c], params[:, c:2 * c]
    beta = params[:, 2 * c:] if self.use_bias else None
    return _instance_norm_plus(x, gamma, alpha, beta)


class ConditionalInstanceNorm(nn.Module):
  """Instance normalization with (gamma, beta) rows of a [num_classes, 2C] embedding."""
  num_classes: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, y):
    c = x.shape[-1]
    h, _ = _instance_standardize(x)
    if not self.use_bias:
      return _per_channel(_conditional_embed(self.num_classes, c, c)(y)) * h
    params = _conditional_embed(self.num_classes, 2 * c, c)(y)
    return _per_channel(params[:, :c]) * h + _per_channel(params[:, c:])


class ConditionalVarianceNorm(nn.Module):
  """VarianceNorm with its scale a row of a [num_classes, C] embedding (~ N(1, 0.02^2))."""
  num_classes: int

  @nn.compact
  def __call__(self, x, y):
    scale = _conditional_embed(self.num_classes, x.shape[-1], x.shape[-1])(y)
    return _variance_normalize(x) * _per_channel(scale)


NORMALIZATIONS: dict[str, Callable[..., nn.Module]] = {
    'InstanceNorm++': InstanceNormPlus,
    'InstanceNorm': InstanceNorm,
    'VarianceNorm': VarianceNorm,
    'GroupNorm': GroupNorm,
}
CONDITIONAL_NORMALIZATIONS: dict[str, Callable[..., nn.Module]] = {
    'InstanceNorm++': ConditionalInstanceNormPlus,
    'InstanceNorm': ConditionalInstanceNorm,
    'VarianceNorm': ConditionalVarianceNorm,
}


def get_normalization(name: str, conditional: bool = False):
  """The normalization class called ``name`` (the reference's config spelling).

  Args:
    name: 'InstanceNorm++', 'InstanceNorm', 'VarianceNorm' or (unconditional only) 'GroupNorm'.
    conditional: return the label-conditional version (constructed with num_classes=...).

  Returns:
    A Flax module class; unconditional ones are applied as norm(x), conditional as norm(x, y).
  """
  table = CONDITIONAL_NORMALIZATIONS if conditional else NORMALIZATIONS
  if name not in table:
    kind = 'conditional ' if conditional else ''
    raise ValueError(f'unknown {kind}normalization {name!r}; valid: {sorted(table)}')
  return table[name]
