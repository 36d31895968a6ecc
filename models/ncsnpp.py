"""The NCSN++ / DDPM++ architecture family (Song et al. 2021, Sec. 4.4 and Appendix H).

One U-Net, `NCSNpp`, whose options span NCSN++ (FIR resampling, BigGAN blocks,
progressive input, Fourier features), DDPM++ (BigGAN blocks, positional embedding)
and the original DDPM U-Net (Ho et al. 2020: DDPM blocks, conv resampling). The
named variants below are `functools.partial`s of it, with the hyperparameters of
the reference configs (configs/{ve,vp,subvp}/... of score_sde), and `DigitsUNet`,
the small network of the digits configs.

Labels. The network embeds whatever label its caller's convention gives it. Under the
reference's conventions (models/score.reference_network_score) that is a noise level
sigma (embedding 'fourier', of log sigma), 999 t or an integer step ('positional').
Under ours (models/score.network_score: inputs scaled to unit variance, noise
prediction) it is the time t in [0, 1] itself: embedding 'fourier_time', Fourier
features of t, as the toy MLP embeds it. Both embeddings are defined once, in
models/layers.py.

Module order (for checkpoint import). Every parameterized submodule of `NCSNpp` is
named `all_modules_{i}`, where i is its index in the reference PyTorch model's
`all_modules` list (reference state-dict key `all_modules.{i}.<...>`): the
reference registers that list in exactly the order its forward pass uses it, and
`NCSNpp.__call__` creates the modules in that same order with the same counter.
Inside each block the names are the reference's attribute names (GroupNorm_0,
Conv_0, Dense_0, GroupNorm_1, Conv_1, Conv_2 or NIN_0; NIN_0..NIN_3 in attention;
Conv_0 or Conv2d_0 in resamplers; Conv_0 in Combine). The Fourier projection is
all_modules_0 with the parameter 'W'. The reference's `pyramid_upsample` /
`pyramid_downsample` for output_skip / input_skip hold no parameters and are
plain functions here. Layout: conv kernels HWIO vs OIHW, Dense kernels transposed
vs torch Linear, NIN W identical. For the DDPM model (reference models/ddpm.py)
the list order is the same with no Fourier entry; its GroupNorms have 32 groups at
every width (num_groups=32), as the reference's.
"""
from __future__ import annotations

import functools
import itertools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from models import layers

_RESBLOCKS = ('ddpm', 'biggan')
_SQRT2 = layers._SQRT2
_PROGRESSIVE = ('none', 'output_skip', 'residual')
_PROGRESSIVE_INPUT = ('none', 'input_skip', 'residual')
_COMBINE = ('sum', 'cat')
_EMBEDDINGS = ('fourier', 'fourier_time', 'positional')


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f'{name} must be one of {allowed}; got {value!r}')


class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ / DDPM U-Net mapping (x [B, H, W, C], labels [B]) to [B, H, W, C].

  Attributes:
    nf: base number of channels; the time embedding has 4 nf features.
    ch_mult: channel multiplier per resolution; H and W halve between levels.
    num_res_blocks: residual blocks per level on the way down (num_res_blocks + 1 up).
    attn_resolutions: spatial sizes (H) at which self-attention is applied.
    dropout: dropout rate in residual blocks (train=True only, rng 'dropout').
    resamp_with_conv: resample with a (fused) 3x3 conv ('ddpm' blocks only).
    fir: FIR resampling with `fir_kernel` instead of nearest / average pooling.
    fir_kernel: 1-D FIR kernel, e.g. (1, 3, 3, 1).
    skip_rescale: divide every residual / skip sum by sqrt(2).
    resblock_type: 'ddpm' (separate resamplers) or 'biggan' (resampling residual blocks).
    progressive: output pyramid, 'none' | 'output_skip' | 'residual'.
    progressive_input: input pyramid, 'none' | 'input_skip' | 'residual'.
    progressive_combine: 'sum' or 'cat', how input_skip merges the pyramid.
    embedding_type: 'fourier' (Gaussian Fourier features of log(labels), for continuous
      sigma labels), 'fourier_time' (Gaussian Fourier features of the labels themselves,
      for times t in [0, 1] under our convention) or 'positional' (sinusoidal of the
      labels themselves, max_positions 10000).
    fourier_scale: standard deviation of the Fourier frequencies.
    scale_by_sigma: divide the output by the noise level: the label itself (continuous VE,
      whose label is sigma) or, when ``sigmas`` is given, ``sigmas[label]`` (discrete VE,
      whose label indexes the noise levels).
    sigmas: the discrete noise levels in DESCENDING order (the reference's order), for
      scale_by_sigma with integer labels; None for continuous labels.
    conditional: use the noise-level embedding at all.
    init_scale: init scale of each block's last conv, attention output and output
      convs; 0 gives zeros (the untrained output is then exactly 0).
    nonlinearity: 'swish' / 'silu', 'relu', 'lrelu' or 'elu'.
    centered: inputs are already in [-1, 1]; otherwise [0, 1] inputs are mapped by 2x - 1.
    num_groups: GroupNorm groups; None gives min(C // 4, 32) (NCSN++ / DDPM++), the DDPM
      U-Net has 32 at every width.
    dtype: compute dtype, float32 or bfloat16 (mixed precision). Parameters are always
      float32 (so optimizer, EMA and checkpoints do not depend on it). float32 computes
      as the inputs promote (unchanged behaviour, float64 inputs under x64 included).
      With bfloat16, convolutions, dense layers, attention matmuls and FIR resampling
      run in bfloat16; the noise-level embedding (Fourier / sinusoidal features of the
      label), the GroupNorm statistics, the attention softmax and the final division by
      sigma are float32, and the output is returned as float32.
  """
  nf: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  fir: bool = True
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  skip_rescale: bool = True
  resblock_type: str = 'biggan'
  progressive: str = 'none'
  progressive_input: str = 'residual'
  progressive_combine: str = 'sum'
  embedding_type: str = 'fourier'
  fourier_scale: float = 16.0
  scale_by_sigma: bool = True
  conditional: bool = True
  init_scale: float = 0.0
  nonlinearity: str = 'swish'
  centered: bool = False
  sigmas: Sequence[float] | None = None
  dtype: jnp.dtype = jnp.float32
  num_groups: int | None = None

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    """Applies the network.

    Args:
      x: [B, H, W, C] float32, H = W divisible by 2**(len(ch_mult) - 1).
      labels: [B] noise-conditioning labels: sigma (VE continuous), 999 t (VP continuous)
        or the integer step (discrete) under the reference's conventions; t in [0, 1]
        under ours. Must be positive with 'fourier' (log is taken).
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      [B, H, W, C] network output (divided by labels when scale_by_sigma).
    """
    _check('resblock_type', self.resblock_type, _RESBLOCKS)
    _check('progressive', self.progressive, _PROGRESSIVE)
    _check('progressive_input', self.progressive_input, _PROGRESSIVE_INPUT)
    _check('progressive_combine', self.progressive_combine, _COMBINE)
    _check('embedding_type', self.embedding_type, _EMBEDDINGS)
    num_levels = len(self.ch_mult)
    factor = 2 ** (num_levels - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'NCSNpp needs x [B, H, W, C] with H, W divisible by {factor} '
                       f'(2**(len(ch_mult)-1) for ch_mult={tuple(self.ch_mult)}); '
                       f'got shape {x.shape}')
    labels = jnp.broadcast_to(labels, x.shape[:1])
    act = layers.get_act(self.nonlinearity)
    # None: Flax infers the dtype from inputs and parameters (the float32 path).
    mixed = jnp.dtype(self.dtype) != jnp.float32
    dtype = jnp.dtype(self.dtype) if mixed else None
    nf, channels = self.nf, x.shape[-1]
    index = itertools.count()

    def name():
      """The next reference all_modules index, as a module name."""
      return f'all_modules_{next(index)}'

    def resblock(h, temb, out_ch=None, up=False, down=False):
      if self.resblock_type == 'ddpm':
        block = layers.ResnetBlockDDPM(
            out_ch=out_ch, act=act, dropout=self.dropout, skip_rescale=self.skip_rescale,
            init_scale=self.init_scale, dtype=dtype, num_groups=self.num_groups, name=name())
      else:
        block = layers.ResnetBlockBigGAN(
            out_ch=out_ch, up=up, down=down, act=act, dropout=self.dropout, fir=self.fir,
            fir_kernel=self.fir_kernel, skip_rescale=self.skip_rescale,
            init_scale=self.init_scale, dtype=dtype, num_groups=self.num_groups, name=name())
      return block(h, temb, train)

    def attn(h):
      return layers.AttnBlock(skip_rescale=self.skip_rescale, init_scale=self.init_scale,
                              dtype=dtype, num_groups=self.num_groups, name=name())(h)

    def norm(h):
      return layers.group_norm(h.shape[-1], name=name(), dtype=dtype,
                               num_groups=self.num_groups)(h)

    def rescaled_sum(a, b):
      return (a + b) / _SQRT2 if self.skip_rescale else a + b

    # Noise-level embedding, in float32 (bfloat16 would quantize the noise level); the
    # dense layers after it compute in dtype.
    if mixed:
      labels = labels.astype(jnp.float32)
    if self.embedding_type == 'fourier':
      temb = layers.GaussianFourierProjection(
          embedding_size=nf, scale=self.fourier_scale, name=name())(jnp.log(labels))
    elif self.embedding_type == 'fourier_time':
      temb = layers.GaussianFourierProjection(
          embedding_size=nf, scale=self.fourier_scale, name=name())(labels)
    else:
      temb = layers.positional_embedding(labels, nf)
    if self.conditional:
      temb = layers.dense(4 * nf, name=name(), dtype=dtype)(temb)
      temb = layers.dense(4 * nf, name=name(), dtype=dtype)(act(temb))
    else:
      temb = None

    if not self.centered:
      x = 2 * x - 1.0  # [0, 1] -> [-1, 1]
    if mixed:
      x = x.astype(dtype)

    # Downsampling path.
    input_pyramid = x if self.progressive_input != 'none' else None
    hs = [layers.conv3x3(nf, name=name(), dtype=dtype)(x)]
    for level in range(num_levels):
      for _ in range(self.num_res_blocks):
        h = resblock(hs[-1], temb, out_ch=nf * self.ch_mult[level])
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
        hs.append(h)
      if level != num_levels - 1:
        if self.resblock_type == 'ddpm':
          h = layers.Downsample(with_conv=self.resamp_with_conv, fir=self.fir,
                                fir_kernel=self.fir_kernel, dtype=dtype, name=name())(hs[-1])
        else:
          h = resblock(hs[-1], temb, down=True)
        if self.progressive_input == 'input_skip':
          input_pyramid = _pyramid_down(input_pyramid, self.fir, self.fir_kernel)
          h = layers.Combine(method=self.progressive_combine, dtype=dtype,
                             name=name())(input_pyramid, h)
        elif self.progressive_input == 'residual':
          input_pyramid = layers.Downsample(
              out_ch=h.shape[-1], with_conv=True, fir=self.fir, fir_kernel=self.fir_kernel,
              dtype=dtype, name=name())(input_pyramid)
          input_pyramid = h = rescaled_sum(input_pyramid, h)
        hs.append(h)

    # Middle.
    h = resblock(hs[-1], temb)
    h = attn(h)
    h = resblock(h, temb)

    # Upsampling path.
    pyramid = None
    for level in reversed(range(num_levels)):
      for _ in range(self.num_res_blocks + 1):
        h = resblock(jnp.concatenate([h, hs.pop()], axis=-1), temb,
                     out_ch=nf * self.ch_mult[level])
      if h.shape[1] in self.attn_resolutions:
        h = attn(h)
      if self.progressive == 'output_skip':
        # GroupNorm-act-conv to image channels at every level, summed up the pyramid.
        if pyramid is not None:
          pyramid = _pyramid_up(pyramid, self.fir, self.fir_kernel)
        pyramid_h = act(norm(h))
        pyramid_h = layers.conv3x3(channels, init_scale=self.init_scale, name=name(),
                                   dtype=dtype)(pyramid_h)
        pyramid = pyramid_h if pyramid is None else pyramid + pyramid_h
      elif self.progressive == 'residual':
        if pyramid is None:
          pyramid = act(norm(h))
          pyramid = layers.conv3x3(h.shape[-1], name=name(), dtype=dtype)(pyramid)
        else:
          pyramid = layers.Upsample(out_ch=h.shape[-1], with_conv=True, fir=self.fir,
                                    fir_kernel=self.fir_kernel, dtype=dtype,
                                    name=name())(pyramid)
          pyramid = h = rescaled_sum(pyramid, h)
      if level != 0:
        if self.resblock_type == 'ddpm':
          h = layers.Upsample(with_conv=self.resamp_with_conv, fir=self.fir,
                              fir_kernel=self.fir_kernel, dtype=dtype, name=name())(h)
        else:
          h = resblock(h, temb, up=True)
    assert not hs

    if self.progressive == 'output_skip':
      h = pyramid
    else:
      h = act(norm(h))
      h = layers.conv3x3(channels, init_scale=self.init_scale, name=name(), dtype=dtype)(h)

    if mixed:
      h = h.astype(jnp.float32)
    if self.scale_by_sigma:
      if self.sigmas is None:
        sigma = labels
      else:
        sigma = jnp.asarray(self.sigmas, h.dtype)[jnp.round(labels).astype(jnp.int32)]
      h = h / sigma[:, None, None, None]
    return h


def _pyramid_down(x, fir, fir_kernel):
  """Parameter-free downsampling of the input pyramid (reference: pyramid_downsample)."""
  return layers.downsample_2d(x, fir_kernel) if fir else layers.naive_downsample_2d(x)


def _pyramid_up(x, fir, fir_kernel):
  """Parameter-free upsampling of the output pyramid (reference: pyramid_upsample)."""
  return layers.upsample_2d(x, fir_kernel) if fir else layers.naive_upsample_2d(x)


# Named variants, with the hyperparameters of the reference configs. `centered` follows
# each config's data.centered (VE: False, VP / sub-VP: True).

# ve/cifar10_ncsnpp_continuous: 62,758,915 parameters at 32x32x3.
NCSNppCifar10 = functools.partial(
    NCSNpp, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
    dropout=0.1, resamp_with_conv=True, fir=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True,
    resblock_type='biggan', progressive='none', progressive_input='residual',
    progressive_combine='sum', embedding_type='fourier', fourier_scale=16.0,
    scale_by_sigma=True, conditional=True, init_scale=0.0, nonlinearity='swish',
    centered=False)
# ve/cifar10_ncsnpp_deep_continuous.
NCSNppDeepCifar10 = functools.partial(NCSNppCifar10, num_res_blocks=8)
# ve/cifar10_ncsnpp (discrete VE, positional): the label is the index of the noise level;
# the reference divides by sigmas[label] there, i.e. scale_by_sigma=True with `sigmas`.
NCSNppPositionalCifar10 = functools.partial(
    NCSNppCifar10, embedding_type='positional', scale_by_sigma=False)
# vp/cifar10_ncsnpp(_continuous): same layers, VP conventions.
NCSNppVPCifar10 = functools.partial(
    NCSNppCifar10, embedding_type='positional', scale_by_sigma=False, centered=True)
# vp/ and subvp/cifar10_ncsnpp_deep_continuous.
NCSNppDeepVPCifar10 = functools.partial(NCSNppVPCifar10, num_res_blocks=8)
# vp/ and subvp/cifar10_ddpmpp(_continuous).
DDPMppCifar10 = functools.partial(
    NCSNppCifar10, fir=False, progressive_input='none', embedding_type='positional',
    scale_by_sigma=False, centered=True)
# vp/ and subvp/cifar10_ddpmpp_deep_continuous.
DDPMppDeepCifar10 = functools.partial(DDPMppCifar10, num_res_blocks=8)
# ve/{bedroom,church,ffhq_256,celebahq_256}_ncsnpp_continuous (256x256).
NCSNpp256 = functools.partial(
    NCSNppCifar10, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, dropout=0.0,
    progressive='output_skip', progressive_input='input_skip')
# ve/ffhq_ncsnpp_continuous (1024x1024).
NCSNpp1024 = functools.partial(
    NCSNpp256, nf=16, ch_mult=(1, 2, 4, 8, 16, 32, 32, 32), num_res_blocks=1)
# DDPM (Ho et al. 2020): vp/ddpm/cifar10; ve/cifar10_ddpm adds scale_by_sigma=True with
# `sigmas` (the reference divides by sigmas[label] there).
DDPM = functools.partial(
    NCSNpp, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
    dropout=0.1, resamp_with_conv=True, fir=False, skip_rescale=False, resblock_type='ddpm',
    progressive='none', progressive_input='none', embedding_type='positional',
    scale_by_sigma=False, conditional=True, init_scale=0.0, nonlinearity='swish',
    centered=True, num_groups=32)
# vp/ddpm/{bedroom,church,celebahq} (256x256).
DDPM256 = functools.partial(DDPM, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)

# The digits network (configs/digits_base.py), under our convention: inputs scaled to unit
# variance (taken as they are: centered=True), label t in [0, 1] embedded by Fourier
# features, noise prediction. The smallest DDPM-style member of the family: two levels,
# one block per level, attention only in the middle, GroupNorm min(C // 4, 32). Width 24
# keeps the size and cost of the U-Net it replaced (369,457 parameters at 8x8x1, about
# the same training step time; 655,169 and about twice the time at width 32).
DigitsUNet = functools.partial(
    NCSNpp, nf=24, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
    resamp_with_conv=True, fir=False, skip_rescale=False, resblock_type='ddpm',
    progressive='none', progressive_input='none', embedding_type='fourier_time',
    fourier_scale=16.0, scale_by_sigma=False, conditional=True, init_scale=0.0,
    nonlinearity='swish', centered=True)
