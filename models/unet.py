"""A small time-conditioned U-Net score network for small images (e.g. 8x8 digits).

Enough to run score-based models end to end on small images; the paper's full
architectures (NCSN++, DDPM++) are separate. The layout is a lean version of
the diffusion U-Net (Ho et al. 2020, Appendix B): residual blocks conditioned on
a time embedding, optional self-attention, strided-conv downsampling, nearest +
conv upsampling, and each up block fed the output of its mirror down block by
concatenation.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.mlp import FourierTimeEmbedding

_EMBEDDINGS = ('fourier', 'positional')


def _group_count(channels, num_groups):
  """min(C // 4, num_groups), lowered until it divides C (GroupNorm needs that)."""
  groups = max(1, min(channels // 4, num_groups))
  while channels % groups:
    groups -= 1
  return groups


def _norm(channels, num_groups):
  return nn.GroupNorm(num_groups=_group_count(channels, num_groups))


def positional_embedding(t, dim, max_positions=10000):
  """Sinusoidal embedding [B, dim] of t [B] (Vaswani et al. 2017, Sec. 3.5).

  t is any real number; the U-Net passes t * 999 so that t in [0, 1] spans the
  same range as DDPM's integer steps.
  """
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_positions) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _upsample_nearest(h):
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel copied to a 2x2 block."""
  b, hgt, wid, c = h.shape
  h = jnp.broadcast_to(h[:, :, None, :, None, :], (b, hgt, 2, wid, 2, c))
  return h.reshape(b, 2 * hgt, 2 * wid, c)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, with the time embedding added in between."""
  out_ch: int
  dropout: float = 0.0
  num_groups: int = 8

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    h = nn.silu(_norm(x.shape[-1], self.num_groups)(x))
    h = nn.Conv(self.out_ch, (3, 3))(h)
    # Per-channel shift from the time embedding, broadcast over H and W.
    h = h + nn.Dense(self.out_ch)(nn.silu(emb))[:, None, None, :]
    h = nn.silu(_norm(self.out_ch, self.num_groups)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (3, 3))(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), name='skip')(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions, with a residual connection."""
  num_groups: int = 8

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = _norm(c, self.num_groups)(x).reshape(b, hgt * wid, c)
    q, k, v = (nn.Dense(c, name=name)(h) for name in ('query', 'key', 'value'))
    weights = jax.nn.softmax(jnp.einsum('bqc,bkc->bqk', q, k) / jnp.sqrt(c), axis=-1)
    h = jnp.einsum('bqk,bkc->bqc', weights, v)
    h = nn.Dense(c, kernel_init=nn.initializers.zeros, name='out')(h)
    return x + h.reshape(b, hgt, wid, c)


class UNet(nn.Module):
  """Maps (x [B, H, W, C], t [B] in [0, 1]) to an output of x's shape.

  The output is the network's raw prediction; the caller turns it into a score
  for a given SDE (e.g. score = -output / std(t)). The final convolution starts
  at zero, so the initial output is exactly 0. Every op acts per example
  (GroupNorm included), so the batch may be sharded across devices.

  Attributes:
    ch: base number of channels.
    ch_mult: channel multiplier per resolution level; H and W are halved between levels.
    num_res_blocks: residual blocks per level, on the way down and again on the way up.
    attn_resolutions: spatial sizes (H) at which self-attention follows each block.
    dropout: dropout rate inside residual blocks (active only with train=True).
    embed_dim: size of the time embedding.
    embedding: 'fourier' (fixed random features of t) or 'positional' (sinusoidal of t * 999).
    num_groups: GroupNorm groups, min(C // 4, num_groups) (lowered until it divides C).
  """
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 1
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  embed_dim: int = 128
  embedding: str = 'fourier'
  num_groups: int = 8

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    """Applies the network.

    Args:
      x: [B, H, W, C] float32, H and W divisible by 2**(len(ch_mult) - 1).
      t: [B] (or a scalar, broadcast to [B]) float32 times in [0, 1].
      train: enables dropout, which then needs the 'dropout' rng.

    Returns:
      [B, H, W, C], the raw network output.
    """
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f'UNet needs x of shape [B, H, W, C] with H and W divisible by {factor} '
          f'(2**(len(ch_mult)-1) for ch_mult={tuple(self.ch_mult)}); got shape {x.shape}')
    t = jnp.broadcast_to(t, x.shape[:1])
    if self.embedding == 'fourier':
      emb = FourierTimeEmbedding(self.embed_dim)(t)
    elif self.embedding == 'positional':
      emb = positional_embedding(t * 999, self.embed_dim)
    else:
      raise ValueError(f'embedding must be one of {_EMBEDDINGS}; got {self.embedding!r}')
    emb = nn.Dense(self.embed_dim)(nn.silu(nn.Dense(self.embed_dim)(emb)))

    def block(h, out_ch):
      """A residual block, then self-attention if h's resolution is listed."""
      h = ResBlock(out_ch, self.dropout, self.num_groups)(h, emb, train)
      return AttnBlock(self.num_groups)(h) if h.shape[1] in self.attn_resolutions else h

    last = len(self.ch_mult) - 1

    h = nn.Conv(self.ch, (3, 3))(x)
    skips = []
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(h, self.ch * mult)
        skips.append(h)
      if level != last:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)

    h = block(h, h.shape[-1])

    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks):
        h = block(jnp.concatenate([h, skips.pop()], axis=-1), self.ch * self.ch_mult[level])
      if level != 0:
        h = nn.Conv(self.ch * self.ch_mult[level - 1], (3, 3))(_upsample_nearest(h))

    h = nn.silu(_norm(h.shape[-1], self.num_groups)(h))
    return nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, name='conv_out')(h)
