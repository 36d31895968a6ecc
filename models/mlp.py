"""A small time-conditioned MLP score network for low-dimensional (toy) data."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from models import layers


class ScoreMLP(nn.Module):
  """Maps (x [batch, D], t [batch]) to an output [batch, D].

  The output is the network's raw prediction; the caller turns it into a score
  for a given SDE (e.g. score = -output / std(t)). Time enters through Gaussian
  Fourier features of t (layers.GaussianFourierProjection, scale 16), added to
  every hidden layer.

  Attributes:
    hidden: widths of the hidden layers.
    embed_dim: size of the time embedding (embed_dim // 2 frequencies, sin and cos).
  """
  hidden: Sequence[int] = (128, 128, 128)
  embed_dim: int = 64

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    del train   # no dropout: the same signature as the image networks
    # The submodule keeps the name it had before the projection was shared, so that W
    # is drawn from the same key and an initialized MLP is unchanged.
    emb = layers.GaussianFourierProjection(embedding_size=self.embed_dim // 2, scale=16.0,
                                           name='FourierTimeEmbedding_0')(t)
    h = x
    for width in self.hidden:
      h = nn.Dense(width)(h) + nn.Dense(width)(emb)
      h = nn.silu(h)
    return nn.Dense(x.shape[-1])(h)
