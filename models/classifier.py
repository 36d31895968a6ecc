"""Noise-conditional classifiers: logits of p_t(y | x_t) for class guidance.

Both take ``(x_t [B, H, W, C], t [B])`` and return ``[B, num_classes]`` logits; the input
is scaled to unit variance with the SDE's marginal (``score.input_scale``, as the score
networks here) by ``log_prob``, so one network serves every noise level of any SDE.

``NoiseConditionalCNN`` is the small digits classifier; ``NoiseConditionalWideResNet`` a
Wide ResNet (depth 28, widen 10 for CIFAR-10, the setting of the SDE paper's class-
conditional CIFAR-10 samples) whose blocks add a projection of the time embedding.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models import score as score_lib
from sde_lib import batch_broadcast


class _TimeEmbedding(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, t):
    emb = layers.positional_embedding(t * 999.0, self.dim)
    return nn.Dense(self.dim)(nn.swish(nn.Dense(self.dim)(emb)))


class NoiseConditionalCNN(nn.Module):
  """Conv blocks with the time embedding added per channel, halving the size twice."""
  num_classes: int = 10
  nf: int = 32
  embed_dim: int = 64

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    del train
    temb = _TimeEmbedding(self.embed_dim)(t)
    h = x
    for i, width in enumerate((self.nf, self.nf, 2 * self.nf, 2 * self.nf)):
      h = nn.Conv(width, (3, 3))(h)
      h = h + nn.Dense(width)(temb)[:, None, None, :]
      h = nn.swish(nn.GroupNorm(num_groups=min(8, width))(h))
      if i % 2 == 1:
        h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding='SAME')
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_classes)(nn.swish(nn.Dense(2 * self.nf)(h)))


class _WideBlock(nn.Module):
  width: int
  stride: int
  dropout: float

  @nn.compact
  def __call__(self, x, temb, train):
    h = nn.swish(nn.GroupNorm(num_groups=min(32, x.shape[-1] // 4 or 1))(x))
    shortcut = x
    if x.shape[-1] != self.width or self.stride != 1:
      shortcut = nn.Conv(self.width, (1, 1), strides=self.stride)(h)
    h = nn.Conv(self.width, (3, 3), strides=self.stride)(h)
    h = h + nn.Dense(self.width)(temb)[:, None, None, :]
    h = nn.swish(nn.GroupNorm(num_groups=min(32, self.width // 4))(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.width, (3, 3))(h)
    return shortcut + h


class NoiseConditionalWideResNet(nn.Module):
  """WRN-depth-widen with a time embedding in every block ((depth - 4) / 6 blocks per stage)."""
  num_classes: int = 10
  depth: int = 28
  widen: int = 10
  dropout: float = 0.0
  embed_dim: int = 128

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6 n + 4, got {self.depth}')
    n = (self.depth - 4) // 6
    temb = _TimeEmbedding(self.embed_dim)(t)
    h = nn.Conv(16, (3, 3))(x)
    for stage, width in enumerate((16 * self.widen, 32 * self.widen, 64 * self.widen)):
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        h = _WideBlock(width, stride, self.dropout)(h, temb, train)
    h = nn.swish(nn.GroupNorm(num_groups=32)(h))
    return nn.Dense(self.num_classes)(jnp.mean(h, axis=(1, 2)))


CLASSIFIERS = {'cnn': NoiseConditionalCNN, 'wideresnet': NoiseConditionalWideResNet}


def get_classifier(name: str, **kwargs) -> nn.Module:
  if name not in CLASSIFIERS:
    raise ValueError(f'Unknown classifier {name!r}; valid names: {sorted(CLASSIFIERS)}')
  return CLASSIFIERS[name](**kwargs)


def log_prob(model, sde, params, data_std, x, t):
  """log p_t(y | x_t) ``[B, num_classes]``, the input scaled to unit variance as the score's."""
  a, std = sde.marginal_coeffs(t)
  c_in = score_lib.input_scale(a, std, data_std)
  return jax.nn.log_softmax(model.apply(params, x * batch_broadcast(c_in, x), t), axis=-1)


@dataclasses.dataclass(frozen=True)
class _ClassifierLogProb:
  """Hashable by its model, so a log-probability built anew reuses compiled code."""
  model: Any

  def __call__(self, sde, params, data_std, x, t):
    return log_prob(self.model, sde, params, data_std, x, t)


def classifier_log_prob(model, sde, params, data_std: float):
  """``log_prob_fn(x_t, t) -> [B, num_classes]`` (a pytree: new parameters do not recompile)."""
  return jax.tree_util.Partial(_ClassifierLogProb(model), sde, params,
                               jnp.asarray(data_std, jnp.float32))
