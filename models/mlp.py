"""A small time-conditioned MLP score network for low-dimensional (toy) data."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class FourierTimeEmbedding(nn.Module):
  """Random Fourier features of t (fixed frequencies, Tancik et al. 2020)."""
  features: int = 64
  scale: float = 16.0

  @nn.compact
  def __call__(self, t):
    # Fixed frequencies: a parameter (so checkpoints carry it) that is never trained.
    w = jax.lax.stop_gradient(
        self.param('w', nn.initializers.normal(self.scale), (self.features // 2,)))
    proj = t[:, None] * w[None, :] * 2 * jnp.pi
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class ScoreMLP(nn.Module):
  """Maps (x [batch, D], t [batch]) to an output [batch, D].

  The output is the network's raw prediction; the caller turns it into a score
  for a given SDE (e.g. score = -output / std(t)).

  Attributes:
    hidden: widths of the hidden layers.
    embed_dim: size of the time embedding.
  """
  hidden: Sequence[int] = (128, 128, 128)
  embed_dim: int = 64

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    del train   # no dropout: the same signature as the image networks
    emb = FourierTimeEmbedding(self.embed_dim)(t)
    h = x
    for width in self.hidden:
      h = nn.Dense(width)(h) + nn.Dense(width)(emb)
      h = nn.silu(h)
    return nn.Dense(x.shape[-1])(h)
