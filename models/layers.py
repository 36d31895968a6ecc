"""Layers shared by the NCSN++ / DDPM++ / DDPM family (models/ncsnpp.py).

Everything is NHWC. Sources: the DDPM U-Net blocks (Ho et al. 2020, Appendix B),
the BigGAN-style residual blocks and progressive growing of NCSN++ (Song et al.
2021, Appendix H), and StyleGAN2's FIR resampling (Karras et al. 2020), whose
`upfirdn2d` is written here with `lax` ops only.

Submodule names follow the reference implementation's attribute names
(GroupNorm_0, Conv_0, Dense_0, NIN_0, Conv2d_0, ...) so that a checkpoint importer
can map parameters one to one. Layout differences from the PyTorch reference:
conv kernels are HWIO (PyTorch: OIHW), Dense kernels are [in, out] (PyTorch
Linear: [out, in]; the reference NIN's W is already [in, out]).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DIMS = ('NHWC', 'HWIO', 'NHWC')
# A Python float, weakly typed: dividing a bfloat16 array by it keeps bfloat16 (a NumPy
# float64 scalar would promote the result to float32).
_SQRT2 = float(np.sqrt(2.0))

_ACTIVATIONS = {
    'swish': nn.silu,
    'silu': nn.silu,
    'relu': nn.relu,
    'lrelu': lambda x: nn.leaky_relu(x, negative_slope=0.2),
    'elu': nn.elu,
}


def get_act(name):
  """The nonlinearity called `name` ('swish'/'silu', 'relu', 'lrelu' (slope 0.2), 'elu')."""
  try:
    return _ACTIVATIONS[name.lower()]
  except KeyError:
    raise ValueError(f'nonlinearity must be one of {sorted(_ACTIVATIONS)}; got {name!r}') from None


def default_init(scale=1.0):
  """DDPM's initializer: variance scaling, mode fan_avg, uniform; scale 0 gives zeros.

  (The reference uses scale 1e-10 instead of 0; zeros make the untrained output exactly 0.)
  """
  if scale == 0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def group_norm(channels, name=None, dtype=None, num_groups=None):
  """GroupNorm with min(C // 4, 32) groups (NCSN++) or `num_groups` (DDPM: 32), eps 1e-6.

  `dtype` is the output dtype (None: inferred); Flax computes the statistics in float32
  (at least) regardless.
  """
  if num_groups is None:
    num_groups = min(channels // 4, 32)
  if num_groups < 1 or channels % num_groups:
    raise ValueError(f'GroupNorm: {channels} channels do not split into {num_groups} groups')
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def conv3x3(features, init_scale=1.0, name=None, dtype=None):
  """3x3 'same' convolution with bias, DDPM initialization, computed in `dtype`."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)),
                 kernel_init=default_init(init_scale), dtype=dtype, param_dtype=jnp.float32,
                 name=name)


def conv1x1(features, init_scale=1.0, name=None, dtype=None):
  """1x1 convolution with bias, DDPM initialization, computed in `dtype`."""
  return nn.Conv(features, (1, 1), kernel_init=default_init(init_scale), dtype=dtype,
                 param_dtype=jnp.float32, name=name)


def nin(features, init_scale=0.1, name=None, dtype=None):
  """Network-in-network: a per-pixel dense layer over channels (the reference's NIN)."""
  return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype,
                  param_dtype=jnp.float32, name=name)


def dense(features, name=None, dtype=None):
  """Dense layer with DDPM initialization (scale 1), computed in `dtype`."""
  return nn.Dense(features, kernel_init=default_init(), dtype=dtype, param_dtype=jnp.float32,
                  name=name)


def positional_embedding(timesteps, dim, max_positions=10000):
  """Sinusoidal embedding [B, dim] of real `timesteps` [B] (Vaswani et al. 2017, Sec. 3.5).

  Frequencies exp(-log(max_positions) k / (dim/2 - 1)), k < dim/2; [sin, cos] halves,
  zero-padded by one column when dim is odd.
  """
  half = dim // 2
  freqs = jnp.exp(-np.log(max_positions) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi W x), cos(2 pi W x)] of a scalar (Tancik et al. 2020).

  W ~ N(0, scale^2) is a parameter (so it is saved and counted) that is never trained:
  the forward pass reads it through stop_gradient.

  Attributes:
    embedding_size: number of frequencies; the output has 2 * embedding_size features.
    scale: standard deviation of the frequencies.
  """
  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    w = self.param('W', lambda key, shape: self.scale * jax.random.normal(key, shape),
                   (self.embedding_size,))
    proj = x[:, None] * lax.stop_gradient(w)[None, :] * 2 * np.pi
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


# ---------------------------------------------------------------------------
# FIR resampling (StyleGAN2 semantics, factor 2 by default, gain 1).


def _setup_kernel(k):
  """A 1-D kernel becomes its outer product; the result is normalized to sum 1."""
  k = np.asarray(k, dtype=np.float32)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f'FIR kernel must be 1-D or square 2-D; got shape {k.shape}')
  return k / np.sum(k)


def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
  """Upsample by zero insertion, pad, convolve with a 2-D FIR kernel, then decimate.

  For each image and channel: y = downsample_by(down)(conv2d(pad(zero_insert(x, up)), kernel)),
  where zero_insert puts up-1 zeros after every sample (rows and columns), pad adds pad[0]
  zeros before and pad[1] after (negative values crop) on both spatial axes, and conv2d is a
  true (flipped-kernel) 'valid' convolution.

  Args:
    x: [B, H, W, C].
    kernel: [kh, kw] array (NumPy or JAX).
    up: integer upsampling factor.
    down: integer downsampling factor.
    pad: (before, after) padding for both spatial axes, applied after upsampling.

  Returns:
    [B, (H up + pad[0] + pad[1] - kh) // down + 1, (same for W), C].
  """
  b, h, w, c = x.shape
  kernel = jnp.asarray(kernel, x.dtype)
  kh, kw = kernel.shape
  # Channels into the batch: one single-channel convolution for all of them.
  y = jnp.transpose(x, (0, 3, 1, 2)).reshape(b * c, h, w, 1)
  p0, p1 = pad
  # lhs_dilation inserts up-1 zeros between samples; the trailing up-1 zeros of
  # zero_insert become extra padding after.
  y = lax.conv_general_dilated(
      y, jnp.flip(kernel, (0, 1))[:, :, None, None],
      window_strides=(down, down),
      padding=((p0, p1 + up - 1), (p0, p1 + up - 1)),
      lhs_dilation=(up, up),
      dimension_numbers=_DIMS)
  _, ho, wo, _ = y.shape
  return jnp.transpose(y.reshape(b, c, ho, wo), (0, 2, 3, 1))


def upsample_2d(x, k=(1, 3, 3, 1), factor=2, gain=1.0):
  """FIR upsampling [B, H, W, C] -> [B, H factor, W factor, C]; k=(1,)*factor is nearest."""
  k = _setup_kernel(k) * (gain * factor ** 2)
  p = k.shape[0] - factor
  return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x, k=(1, 3, 3, 1), factor=2, gain=1.0):
  """FIR downsampling [B, H, W, C] -> [B, H / factor, W / factor, C]; k=(1,)*factor is avg pool."""
  k = _setup_kernel(k) * gain
  p = k.shape[0] - factor
  return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x, w, k=(1, 3, 3, 1), factor=2, gain=1.0):
  """Fused upsample_2d then 'same' convolution by w [kh, kw, Cin, Cout] (StyleGAN2).

  A stride-`factor` transposed convolution by w, then one FIR filtering pass.
  """
  conv_h, conv_w = w.shape[:2]
  if conv_h != conv_w:
    raise ValueError(f'conv kernel must be square; got {w.shape}')
  k = _setup_kernel(k) * (gain * factor ** 2)
  p = (k.shape[0] - factor) - (conv_w - 1)
  # Transposed convolution: correlation of the zero-dilated, (kw-1)-padded input with w.
  x = lax.conv_general_dilated(
      x, w.astype(x.dtype), window_strides=(1, 1),
      padding=((conv_h - 1, conv_h - 1), (conv_w - 1, conv_w - 1)),
      lhs_dilation=(factor, factor), dimension_numbers=_DIMS)
  return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x, w, k=(1, 3, 3, 1), factor=2, gain=1.0):
  """Fused FIR filtering then stride-`factor` 'valid' convolution by w [kh, kw, Cin, Cout]."""
  conv_h, conv_w = w.shape[:2]
  if conv_h != conv_w:
    raise ValueError(f'conv kernel must be square; got {w.shape}')
  k = _setup_kernel(k) * gain
  p = (k.shape[0] - factor) + (conv_w - 1)
  x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
  return lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(factor, factor),
                                  padding='VALID', dimension_numbers=_DIMS)


def naive_upsample_2d(x, factor=2):
  """Nearest-neighbour upsampling: each pixel copied to a factor x factor block."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


def naive_downsample_2d(x, factor=2):
  """Average pooling over non-overlapping factor x factor blocks."""
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class FIRConv2d(nn.Module):
  """3x3 (or kxk) convolution with optional fused FIR up- or down-sampling by 2.

  Parameters 'kernel' [k, k, Cin, Cout] and 'bias' [Cout] (the reference's
  up_or_down_sampling.Conv2d, whose weight is OIHW).

  Attributes:
    features: output channels.
    kernel_size: odd spatial size of the kernel.
    up: upsample by 2 (fused).
    down: downsample by 2 (fused).
    resample_kernel: 1-D FIR kernel.
    init_scale: scale of the DDPM initialization.
    dtype: compute dtype; None infers it from the inputs (parameters stay float32).
  """
  features: int
  kernel_size: int = 3
  up: bool = False
  down: bool = False
  resample_kernel: Sequence[float] = (1, 3, 3, 1)
  init_scale: float = 1.0
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError('FIRConv2d cannot both upsample and downsample')
    w = self.param('kernel', default_init(self.init_scale),
                   (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    b = self.param('bias', nn.initializers.zeros, (self.features,))
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if self.up:
      x = upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      pad = self.kernel_size // 2
      x = lax.conv_general_dilated(x, w.astype(x.dtype), (1, 1), ((pad, pad), (pad, pad)),
                                   dimension_numbers=_DIMS)
    return x + b.astype(x.dtype)[None, None, None, :]


# ---------------------------------------------------------------------------
# Blocks.


class Combine(nn.Module):
  """Merges a pyramid input x into features y: 1x1 conv of x, then 'cat' or 'sum' with y."""
  method: str = 'cat'
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x, y):
    h = conv1x1(y.shape[-1], name='Conv_0', dtype=self.dtype)(x)
    if self.method == 'cat':
      return jnp.concatenate([h, y], axis=-1)
    if self.method == 'sum':
      return h + y
    raise ValueError(f"progressive_combine must be 'cat' or 'sum'; got {self.method!r}")


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions with a residual connection (DDPM).

  Attributes:
    skip_rescale: divide the residual sum by sqrt(2).
    init_scale: initialization scale of the output projection NIN_3.
  """
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Optional[jnp.dtype] = None
  num_groups: Optional[int] = None   # None: min(C // 4, 32)

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm(c, name='GroupNorm_0',
                 dtype=self.dtype, num_groups=self.num_groups)(x)
    q = nin(c, name='NIN_0', dtype=self.dtype)(y)
    k = nin(c, name='NIN_1', dtype=self.dtype)(y)
    v = nin(c, name='NIN_2', dtype=self.dtype)(y)
    logits = jnp.einsum('bhwc,bijc->bhwij', q, k) * (c ** -0.5)
    if self.dtype is not None:
      # Mixed precision: softmax in float32, the weights back in the compute dtype.
      logits = logits.astype(jnp.float32)
    weights = jax.nn.softmax(logits.reshape(b, h, w, h * w), axis=-1).reshape(b, h, w, h, w)
    if self.dtype is not None:
      weights = weights.astype(self.dtype)
    y = jnp.einsum('bhwij,bijc->bhwc', weights, v)
    y = nin(c, init_scale=self.init_scale, name='NIN_3', dtype=self.dtype)(y)
    return (x + y) / _SQRT2 if self.skip_rescale else x + y


class Upsample(nn.Module):
  """Upsampling by 2: nearest (+ 3x3 conv) or FIR (+ fused 3x3 conv).

  Attributes:
    out_ch: output channels (None keeps the input's); only with with_conv.
    with_conv: follow (or fuse) a 3x3 convolution.
    fir: FIR filter instead of nearest neighbour.
    fir_kernel: 1-D FIR kernel.
    dtype: compute dtype; None infers it from the inputs (parameters stay float32).
  """
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      h = naive_upsample_2d(x)
      return conv3x3(out_ch, name='Conv_0', dtype=self.dtype)(h) if self.with_conv else h
    if self.with_conv:
      return FIRConv2d(out_ch, up=True, resample_kernel=self.fir_kernel, dtype=self.dtype,
                       name='Conv2d_0')(x)
    return upsample_2d(x, self.fir_kernel)


class Downsample(nn.Module):
  """Downsampling by 2: avg pool / stride-2 3x3 conv, or FIR (+ fused 3x3 conv).

  Attributes:
    out_ch: output channels (None keeps the input's); only with with_conv.
    with_conv: use (or fuse) a stride-2 3x3 convolution.
    fir: FIR filter instead of average pooling.
    fir_kernel: 1-D FIR kernel.
    dtype: compute dtype; None infers it from the inputs (parameters stay float32).
  """
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      if self.with_conv:
        # Pad one row/column at the end only, then a 'valid' stride-2 conv (as DDPM does).
        return nn.Conv(out_ch, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                       kernel_init=default_init(), dtype=self.dtype, param_dtype=jnp.float32,
                       name='Conv_0')(x)
      return naive_downsample_2d(x)
    if self.with_conv:
      return FIRConv2d(out_ch, down=True, resample_kernel=self.fir_kernel, dtype=self.dtype,
                       name='Conv2d_0')(x)
    return downsample_2d(x, self.fir_kernel)


class ResnetBlockDDPM(nn.Module):
  """DDPM residual block: GN-act-conv, + Dense(act(temb)), GN-act-dropout-conv, skip.

  Attributes:
    out_ch: output channels (None keeps the input's).
    act: nonlinearity.
    dropout: dropout rate (train=True only, rng 'dropout').
    skip_rescale: divide the residual sum by sqrt(2).
    init_scale: initialization scale of the last conv (Conv_1).
    dtype: compute dtype; None infers it from the inputs (parameters stay float32).
  """
  out_ch: Optional[int] = None
  act: Callable = nn.silu
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Optional[jnp.dtype] = None
  num_groups: Optional[int] = None   # None: min(C // 4, 32)

  @nn.compact
  def __call__(self, x, temb=None, train: bool = False):
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    h = self.act(group_norm(in_ch, name='GroupNorm_0',
                 dtype=self.dtype, num_groups=self.num_groups)(x))
    h = conv3x3(out_ch, name='Conv_0', dtype=self.dtype)(h)
    if temb is not None:
      h = h + dense(out_ch, name='Dense_0', dtype=self.dtype)(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(out_ch, name='GroupNorm_1',
                 dtype=self.dtype, num_groups=self.num_groups)(h))
    h = nn.Dropout(self.dropout, deterministic=not train, name='Dropout_0')(h)
    h = conv3x3(out_ch, init_scale=self.init_scale, name='Conv_1', dtype=self.dtype)(h)
    if in_ch != out_ch:
      x = nin(out_ch, name='NIN_0', dtype=self.dtype)(x)
    return (x + h) / _SQRT2 if self.skip_rescale else x + h


class ResnetBlockBigGAN(nn.Module):
  """BigGAN-style residual block with optional up/down-sampling inside (NCSN++).

  Both branches are resampled right after the first GN-act (FIR or naive); the skip
  branch goes through a 1x1 conv whenever the channels change or it resamples.

  Attributes:
    out_ch: output channels (None keeps the input's).
    up: upsample by 2.
    down: downsample by 2.
    act: nonlinearity.
    dropout: dropout rate (train=True only, rng 'dropout').
    fir: FIR resampling instead of nearest / average pooling.
    fir_kernel: 1-D FIR kernel.
    skip_rescale: divide the residual sum by sqrt(2).
    init_scale: initialization scale of the last conv (Conv_1).
    dtype: compute dtype; None infers it from the inputs (parameters stay float32).
  """
  out_ch: Optional[int] = None
  up: bool = False
  down: bool = False
  act: Callable = nn.silu
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Optional[jnp.dtype] = None
  num_groups: Optional[int] = None   # None: min(C // 4, 32)

  @nn.compact
  def __call__(self, x, temb=None, train: bool = False):
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    h = self.act(group_norm(in_ch, name='GroupNorm_0',
                 dtype=self.dtype, num_groups=self.num_groups)(x))
    if self.up:
      resample = (functools.partial(upsample_2d, k=self.fir_kernel) if self.fir
                  else naive_upsample_2d)
      h, x = resample(h), resample(x)
    elif self.down:
      resample = (functools.partial(downsample_2d, k=self.fir_kernel) if self.fir
                  else naive_downsample_2d)
      h, x = resample(h), resample(x)
    h = conv3x3(out_ch, name='Conv_0', dtype=self.dtype)(h)
    if temb is not None:
      h = h + dense(out_ch, name='Dense_0', dtype=self.dtype)(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(out_ch, name='GroupNorm_1',
                 dtype=self.dtype, num_groups=self.num_groups)(h))
    h = nn.Dropout(self.dropout, deterministic=not train, name='Dropout_0')(h)
    h = conv3x3(out_ch, init_scale=self.init_scale, name='Conv_1', dtype=self.dtype)(h)
    if in_ch != out_ch or self.up or self.down:
      x = conv1x1(out_ch, name='Conv_2', dtype=self.dtype)(x)
    return (x + h) / _SQRT2 if self.skip_rescale else x + h

