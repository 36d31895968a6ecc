"""RefineNet score networks of NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020).

Both are a ResNet encoder of pre-activation residual blocks (normalize, ELU, 3x3
conv, twice) whose deeper stages use dilated convolutions instead of further
downsampling, followed by a RefineNet decoder (Lin et al. 2017): per stage, from
the deepest up, a RefineBlock adapts its inputs with residual conv units (RCU),
fuses them at the finer resolution (multi-resolution fusion, MSF, bilinear
upsampling with aligned corners), pools context with chained residual pooling
(CRP) and ends with one more RCU (three in the last block).

- NCSN (v1) conditions every normalization on the integer noise-level label
  (ConditionalInstanceNorm++), averages in its CRP pooling, and returns the raw
  output (the reference's configs set scale_by_sigma False).
- NCSNv2 is unconditional (InstanceNorm++, no norms in the RefineBlocks, max
  pooling) and divides its output by sigma_label, the technique 3 of "Improved
  Techniques for Training Score-Based Generative Models" (s(x, sigma) = f(x) / sigma).

Labels are integers: label l means entry l of ``VESDE.descending_sigmas`` (geometric
from sigma_max at label 0 down to sigma_min at label num_scales - 1, the reference's
get_sigmas), the VE SDE's label order: ``VESDE.discrete_label(t)`` = round((T - t)(N - 1)).

Variants (constructor arguments, no ConfigDicts):
  NCSNv2      the 32 and 64 pixel network (CIFAR-10, CelebA): ch_mult (1, 2, 2, 2),
              dilations (1, 1, 2, 4); the reference's NCSNv2 ('ncsnv2_64').
  NCSNv2_128  96 to 128 pixels (LSUN bedroom config): (1, 2, 2, 4, 4), (1, 1, 1, 2, 4);
              the reference's NCSNv2_128.
  NCSNv2_256  129 to 256 pixels (no reference config uses it): (1, 2, 2, 2, 4, 4),
              (1, 1, 1, 1, 2, 4); the reference's NCSNv2_256.
  NCSN        v1, the 32 and 64 pixel network, label-conditional; the reference's 'ncsn'.

Parameter tree, and how it maps to the reference PyTorch state_dict
(score_sde_pytorch/models/ncsnv2.py, which mirrors ermongroup/ncsn and ncsnv2).
Submodules are created in forward order under these explicit names (map by name: jax
pytrees, e.g. what jit or eval_shape return, sort dict keys):
  begin_conv                          begin_conv
  res{k}_{j} (k = 1..S, j = 0, 1)     res{k}.{j}; for the 256 variant our res4, res5,
                                      res6 are the reference's res31, res4, res5
    normalize1, conv1, normalize2, conv2, shortcut (if any)
    conv2/conv and shortcut/conv      conv2.conv, shortcut.conv (ConvMeanPool)
  refine{k} (k = 1..S, deepest first) refine{k}; for the 256 variant our refine3..6
                                      are the reference's refine31, refine3, refine4, refine5
    adapt_convs_{i}                   adapt_convs.{i}
      {b}_{s}_norm, {b}_{s}_conv      same names (RCU blocks, 1-indexed; norms in NCSN only)
    msf: norms_{i}, convs_{i}         msf.norms.{i}, msf.convs.{i}
    crp: norms_{i}, convs_{i}         crp.norms.{i}, crp.convs.{i}
    output_convs                      output_convs
  normalizer                          normalizer
  end_conv                            end_conv
Rule: join a ModuleList index to the name before it with '_' (res1.0 -> res1_0,
msf.convs.1 -> msf/convs_1); conv weight -> kernel, transposed (2, 3, 1, 0) from
PyTorch's [out, in, kh, kw] to [kh, kw, in, out]; embed.weight -> embed/embedding.
With that rule, reference state_dicts of tiny NCSN, NCSNv2 and NCSNv2_128 (nf 8, 16x16,
dilated convs padded by the dilation) load into exactly these trees and give the same
outputs to float32 precision (checked with torch 2.13 CPU when this was written).
InstanceNorm++ has alpha, gamma, beta [C]; conditional norms have embed/embedding
[num_classes, 3C] laid out (gamma, alpha, beta), as the reference's embed.weight.

Differences from the JAX reference (score_sde/models/ncsnv2.py), where we follow the
PyTorch ones (score_sde_pytorch, ermongroup/ncsnv2; released checkpoints are PyTorch): NCSNv2's third RefineBlock has nf features
(the JAX one has 2 nf); bilinear upsampling aligns corners; the variance across
channel means in InstanceNorm++ is unbiased. Dilated 3x3 convs keep the spatial
size (padding = dilation, as in ermongroup/ncsnv2; score_sde_pytorch pads by 1,
which shrinks the maps and cannot run).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import sde_lib
from models.normalization import get_normalization

ACTIVATIONS: dict[str, Callable] = {
    'elu': nn.elu,
    'relu': nn.relu,
    'lrelu': functools.partial(nn.leaky_relu, negative_slope=0.2),
    'swish': nn.swish,
}
_INTERPOLATIONS = ('bilinear', 'nearest_neighbor')


def _torch_bias_init(fan_in):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default conv bias."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound


def _conv(x, features, *, kernel_size=3, dilation=1, use_bias=True, name):
  """A stride-1 conv that keeps H and W (padding = dilation (k - 1) / 2), PyTorch's default init.

  Called from a compact method: the conv becomes a child of the calling module.
  """
  pad = dilation * (kernel_size - 1) // 2
  fan_in = x.shape[-1] * kernel_size * kernel_size
  return nn.Conv(
      features, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
      kernel_dilation=(dilation, dilation), use_bias=use_bias,
      kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
      bias_init=_torch_bias_init(fan_in), name=name)(x)


def _mean_pool(x):
  """2x2 average pooling, stride 2 ([B, H, W, C] -> [B, H/2, W/2, C])."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _resize(x, shape, interpolation):
  """Resizes [B, H, W, C] to [B, *shape, C] like F.interpolate(align_corners=True)."""
  for axis, size in ((1, shape[0]), (2, shape[1])):
    n = x.shape[axis]
    if n == size:
      continue
    if interpolation == 'nearest_neighbor':
      x = jnp.take(x, np.floor(np.arange(size) * n / size).astype(np.int32), axis=axis)
      continue
    # Output pixel i samples the input at i (n - 1) / (size - 1): corners meet corners.
    pos = np.arange(size) * ((n - 1) / max(size - 1, 1))
    lo = np.minimum(np.floor(pos).astype(np.int32), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(4)])
    x = jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac
  return x


def _normalize(norm_cls, num_classes, name, h, y):
  """Applies a fresh normalization: conditional on y when num_classes is set."""
  if num_classes is None:
    return norm_cls(name=name)(h)
  return norm_cls(num_classes=num_classes, name=name)(h, y)


class ConvMeanPool(nn.Module):
  """A conv (bias on) then 2x2 mean pooling; the conv is named 'conv' like the reference."""
  features: int
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x):
    return _mean_pool(_conv(x, self.features, kernel_size=self.kernel_size, name='conv'))


class ResidualBlock(nn.Module):
  """Pre-activation residual block: (norm, act, 3x3 conv) twice, plus a shortcut.

  With resample='down' and dilation 1 the second conv and the shortcut (1x1) are
  followed by 2x2 mean pooling; with resample='down' and dilation > 1 nothing is
  pooled (the reference's convention: dilation replaces downsampling), the convs
  and the shortcut are dilated 3x3 convs. Without resampling the shortcut is the
  identity when the channels agree, else a 1x1 (dilated 3x3 if dilation > 1) conv.

  Attributes:
    features: output channels.
    norm: normalization class (from models.normalization).
    num_classes: None for an unconditional block (NCSNv2); the number of noise levels
      for a label-conditional one (NCSN), whose norms then take the labels.
    resample: None or 'down'.
    dilation: dilation of the 3x3 convs.
    act: nonlinearity.
  """
  features: int
  norm: Callable[..., nn.Module]
  num_classes: Optional[int] = None
  resample: Optional[str] = None
  dilation: int = 1
  act: Callable = nn.elu

  @nn.compact
  def __call__(self, x, y=None):
    if self.resample not in (None, 'down'):
      raise ValueError(f"resample must be None or 'down'; got {self.resample!r}")
    c_in, d = x.shape[-1], self.dilation
    down = self.resample == 'down'
    mid = c_in if down else self.features
    h = self.act(_normalize(self.norm, self.num_classes, 'normalize1', x, y))
    h = _conv(h, mid, dilation=d, name='conv1')
    h = self.act(_normalize(self.norm, self.num_classes, 'normalize2', h, y))
    if down and d == 1:
      h = ConvMeanPool(features=self.features, name='conv2')(h)
      return h + ConvMeanPool(features=self.features, kernel_size=1, name='shortcut')(x)
    h = _conv(h, self.features, dilation=d, name='conv2')
    if not down and c_in == self.features:
      return h + x
    if d > 1:
      return h + _conv(x, self.features, dilation=d, name='shortcut')
    return h + _conv(x, self.features, kernel_size=1, name='shortcut')


class RCUBlock(nn.Module):
  """Residual conv units: n_blocks times x + (act, 3x3 conv without bias)^n_stages (x).

  With num_classes set (NCSN), each stage normalizes (conditionally) before the act.
  """
  features: int
  n_blocks: int
  n_stages: int
  norm: Optional[Callable[..., nn.Module]] = None
  num_classes: Optional[int] = None
  act: Callable = nn.elu

  @nn.compact
  def __call__(self, x, y=None):
    for i in range(1, self.n_blocks + 1):
      residual = x
      for j in range(1, self.n_stages + 1):
        if self.norm is not None:
          x = _normalize(self.norm, self.num_classes, f'{i}_{j}_norm', x, y)
        x = _conv(self.act(x), self.features, use_bias=False, name=f'{i}_{j}_conv')
      x = x + residual
    return x


class CRPBlock(nn.Module):
  """Chained residual pooling: x = act(x); path = x; n_stages times path = conv(pool(path)), x += path.

  Pooling is 5x5, stride 1: max (NCSNv2) or average counting the zero padding
  (NCSN). With norm set (NCSN), path is normalized before each pooling.
  """
  features: int
  n_stages: int = 2
  pool: str = 'max'
  norm: Optional[Callable[..., nn.Module]] = None
  num_classes: Optional[int] = None
  act: Callable = nn.elu

  @nn.compact
  def __call__(self, x, y=None):
    x = self.act(x)
    path = x
    for i in range(self.n_stages):
      if self.norm is not None:
        path = _normalize(self.norm, self.num_classes, f'norms_{i}', path, y)
      if self.pool == 'max':
        path = nn.max_pool(path, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2)))
      else:
        path = nn.avg_pool(path, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2)),
                           count_include_pad=True)
      path = _conv(path, self.features, use_bias=False, name=f'convs_{i}')
      x = x + path
    return x


class MSFBlock(nn.Module):
  """Multi-resolution fusion: the sum over inputs of resize(conv3x3(norm?(x_i))) at ``shape``."""
  features: int
  shape: Sequence[int]
  interpolation: str = 'bilinear'
  norm: Optional[Callable[..., nn.Module]] = None
  num_classes: Optional[int] = None

  @nn.compact
  def __call__(self, xs, y=None):
    total = 0.0
    for i, h in enumerate(xs):
      if self.norm is not None:
        h = _normalize(self.norm, self.num_classes, f'norms_{i}', h, y)
      h = _conv(h, self.features, name=f'convs_{i}')
      total = total + _resize(h, self.shape, self.interpolation)
    return total


class RefineBlock(nn.Module):
  """RefineNet block: RCU-adapt each input, fuse at ``shape`` (if several), CRP, output RCU.

  Attributes:
    features: output channels (the single input of a ``start`` block must have these).
    shape: (H, W) of the output, that of the finest input.
    start: the deepest block, with a single input and no fusion.
    end: the last block, whose output RCU has 3 units instead of 1.
    norm, num_classes: None for NCSNv2 (no norms, max pooling); a conditional norm class
      and the number of noise levels for NCSN (norms everywhere, average pooling).
    interpolation: 'bilinear' (aligned corners) or 'nearest_neighbor'.
    act: nonlinearity.
  """
  features: int
  shape: Sequence[int]
  start: bool = False
  end: bool = False
  norm: Optional[Callable[..., nn.Module]] = None
  num_classes: Optional[int] = None
  interpolation: str = 'bilinear'
  act: Callable = nn.elu

  @nn.compact
  def __call__(self, xs, y=None):
    kw = dict(norm=self.norm, num_classes=self.num_classes, act=self.act)
    hs = [RCUBlock(features=h.shape[-1], n_blocks=2, n_stages=2, name=f'adapt_convs_{i}', **kw)(h, y)
          for i, h in enumerate(xs)]
    if self.start:
      h = hs[0]
    else:
      h = MSFBlock(features=self.features, shape=tuple(self.shape), interpolation=self.interpolation,
                   norm=self.norm, num_classes=self.num_classes, name='msf')(hs, y)
    h = CRPBlock(features=self.features, n_stages=2, pool='max' if self.norm is None else 'avg',
                 name='crp', **kw)(h, y)
    return RCUBlock(features=self.features, n_blocks=3 if self.end else 1, n_stages=2,
                    name='output_convs', **kw)(h, y)


class _RefineNet(nn.Module):
  """The shared body of NCSN and NCSNv2; see the module docstring."""
  nf: int = 128
  num_scales: int = 232
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  scale_by_sigma: bool = True
  conditional: bool = False
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  dilations: Sequence[int] = (1, 1, 2, 4)
  normalization: str = 'InstanceNorm++'
  nonlinearity: str = 'elu'
  interpolation: str = 'bilinear'
  centered: bool = False

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    """Applies the network.

    Args:
      x: [B, H, W, C] float32 images, in [0, 1] (centered=False) or [-1, 1] (centered=True);
        H and W divisible by 2 ** (number of stages with dilation 1, minus 1).
      labels: [B] noise-level indices in [0, num_scales) (label 0 = sigma_max), ints or whole floats.
      train: unused (there is no dropout); kept for the common model signature.

    Returns:
      [B, H, W, C]: the score estimate, divided by sigma_labels when scale_by_sigma.
    """
    del train
    if len(self.ch_mult) != len(self.dilations) or len(self.ch_mult) < 2:
      raise ValueError(f'ch_mult {self.ch_mult} and dilations {self.dilations} need one entry '
                       'per stage (at least two)')
    if self.nonlinearity not in ACTIVATIONS:
      raise ValueError(f'nonlinearity must be one of {sorted(ACTIVATIONS)}; got {self.nonlinearity!r}')
    if self.interpolation not in _INTERPOLATIONS:
      raise ValueError(f'interpolation must be one of {_INTERPOLATIONS}; got {self.interpolation!r}')
    factor = 2 ** sum(d == 1 for d in self.dilations[1:])
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'x must be [B, H, W, C] with H and W divisible by {factor}; got {x.shape}')
    act = ACTIVATIONS[self.nonlinearity]
    norm = get_normalization(self.normalization, conditional=self.conditional)
    num_classes = self.num_scales if self.conditional else None
    # Indices may arrive as exact floats (round()): they are cast, not interpolated.
    labels = jnp.round(jnp.asarray(labels)).astype(jnp.int32)
    y = labels if self.conditional else None
    widths = [m * self.nf for m in self.ch_mult]

    h = x if self.centered else 2 * x - 1
    h = _conv(h, self.nf, name='begin_conv')
    # Encoder: stage 1 keeps the resolution, every later one starts with a 'down' block.
    layers = []
    for k, (width, dilation) in enumerate(zip(widths, self.dilations)):
      resample = None if k == 0 else 'down'
      for j in range(2):
        h = ResidualBlock(features=width, norm=norm, num_classes=num_classes,
                          resample=resample if j == 0 else None, dilation=dilation, act=act,
                          name=f'res{k + 1}_{j}')(h, y)
      layers.append(h)
    # Decoder, deepest stage first; stage k's block outputs the width of stage k - 1.
    block = functools.partial(RefineBlock, norm=norm if self.conditional else None,
                              num_classes=num_classes, interpolation=self.interpolation, act=act)
    ref = None
    last = len(layers) - 1
    for r, k in enumerate(range(last, -1, -1)):
      inputs = [layers[k]] if ref is None else [layers[k], ref]
      ref = block(features=widths[max(k - 1, 0)], shape=layers[k].shape[1:3], start=ref is None,
                  end=k == 0, name=f'refine{r + 1}')(inputs, y)
    h = act(_normalize(norm, num_classes, 'normalizer', ref, y))
    h = _conv(h, x.shape[-1], name='end_conv')
    if self.scale_by_sigma:
      sde = sde_lib.VESDE(sigma_min=self.sigma_min, sigma_max=self.sigma_max, N=self.num_scales)
      h = h / sde.descending_sigmas.astype(h.dtype)[labels][:, None, None, None]
    return h


class NCSNv2(_RefineNet):
  """NCSNv2 (Song & Ermon 2020): unconditional RefineNet, output divided by sigma_labels.

  Attributes:
    nf: base channels (ngf); stage widths are nf * ch_mult.
    num_scales: number of noise levels L.
    sigma_min: the smallest noise level (label num_scales - 1).
    sigma_max: the largest noise level (label 0).
    scale_by_sigma: divide the output by sigma_labels (True in every reference config).
    conditional: leave False (True gives NCSN's label-conditional norms).
    ch_mult: width multiplier per encoder stage.
    dilations: dilation per encoder stage; a stage after the first halves H and W
      only when its dilation is 1.
    normalization: 'InstanceNorm++' (default), 'InstanceNorm', 'VarianceNorm' or 'GroupNorm'.
    nonlinearity: 'elu' (default), 'relu', 'lrelu' or 'swish'.
    interpolation: 'bilinear' (aligned corners, default) or 'nearest_neighbor'.
    centered: inputs already in [-1, 1]; otherwise [0, 1] data is mapped by 2 x - 1.
  """


NCSNv2_128 = functools.partial(NCSNv2, ch_mult=(1, 2, 2, 4, 4), dilations=(1, 1, 1, 2, 4))
NCSNv2_256 = functools.partial(NCSNv2, ch_mult=(1, 2, 2, 2, 4, 4), dilations=(1, 1, 1, 1, 2, 4))


class NCSN(_RefineNet):
  """NCSN v1 (Song & Ermon 2019): RefineNet with every norm conditioned on the label.

  The attributes are NCSNv2's; here conditional is True, the norms are the conditional
  ones (ConditionalInstanceNorm++ by default: 'InstanceNorm++', 'InstanceNorm' or
  'VarianceNorm'), each with a [num_scales, 3C] embedding, and scale_by_sigma is False
  as in the reference's configs (the v1 network learns the 1/sigma scaling itself).
  """
  num_scales: int = 10
  sigma_max: float = 1.0
  scale_by_sigma: bool = False
  conditional: bool = True
