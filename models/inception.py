"""The FID Inception-v3 (the 2015 TensorFlow graph of tf-gan, as pytorch-fid ports it) in Flax,
with its bilinear resize and the conversion of pytorch-fid's state dict.

evaluation.py loads the converted weights (checked against their sha256) and turns its
outputs into FID, KID and Inception Score; scripts/convert_inception_weights.py converts.
"""
from __future__ import annotations

import flax.linen as nn
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np


def resize_bilinear(images, size: int = 299, half_pixel_centers: bool = True):
  """Bilinear resize without antialiasing, [B, H, W, C] -> [B, size, size, C].

  half_pixel_centers=True is torch's F.interpolate(mode='bilinear', align_corners=False),
  what pytorch-fid does: source coordinate (i + 0.5) in / out - 0.5, clamped at 0.
  half_pixel_centers=False is TF1's tf.image.resize_bilinear(align_corners=False), what the
  2015 TF graph (tf-gan, clean-fid legacy_tensorflow) does: source coordinate i in / out.
  Both take the two nearest source pixels (the upper one clamped to the edge), so neither
  antialiases when shrinking.
  """
  images = jnp.asarray(images, jnp.float32)

  def matrix(n_in):
    i = np.arange(size, dtype=np.float64)
    if half_pixel_centers:
      src = np.maximum((i + 0.5) * n_in / size - 0.5, 0.)
    else:
      src = i * n_in / size
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    w = src - lo
    out = np.zeros((size, n_in))
    np.add.at(out, (np.arange(size), lo), 1. - w)
    np.add.at(out, (np.arange(size), hi), w)
    return jnp.asarray(out, jnp.float32)

  highest = jax.lax.Precision.HIGHEST
  images = jnp.einsum('oh,bhwc->bowc', matrix(images.shape[1]), images, precision=highest)
  return jnp.einsum('pw,bowc->bopc', matrix(images.shape[2]), images, precision=highest)


class _BasicConv(nn.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU: torch's BasicConv2d."""
  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def avg_pool_3x3(x):
  # The FID blocks average without the zero padding (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class _InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _BasicConv(64, (1, 1), name='branch1x1')(x)
    b5 = _BasicConv(48, (1, 1), name='branch5x5_1')(x)
    b5 = _BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = _BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = _BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = _BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = _BasicConv(self.pool_features, (1, 1), name='branch_pool')(avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _BasicConv(384, (3, 3), strides=(2, 2), name='branch3x3')(x)
    bd = _BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = _BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = _BasicConv(96, (3, 3), strides=(2, 2), name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class _InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = _BasicConv(192, (1, 1), name='branch1x1')(x)
    b7 = _BasicConv(c, (1, 1), name='branch7x7_1')(x)
    b7 = _BasicConv(c, **row, name='branch7x7_2')(b7)
    b7 = _BasicConv(192, **col, name='branch7x7_3')(b7)
    bd = _BasicConv(c, (1, 1), name='branch7x7dbl_1')(x)
    bd = _BasicConv(c, **col, name='branch7x7dbl_2')(bd)
    bd = _BasicConv(c, **row, name='branch7x7dbl_3')(bd)
    bd = _BasicConv(c, **col, name='branch7x7dbl_4')(bd)
    bd = _BasicConv(192, **row, name='branch7x7dbl_5')(bd)
    bp = _BasicConv(192, (1, 1), name='branch_pool')(avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _BasicConv(192, (1, 1), name='branch3x3_1')(x)
    b3 = _BasicConv(320, (3, 3), strides=(2, 2), name='branch3x3_2')(b3)
    b7 = _BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = _BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = _BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = _BasicConv(192, (3, 3), strides=(2, 2), name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class _InceptionE(nn.Module):
  """Mixed_7b (avg pool without padding, pytorch-fid's FIDInceptionE_1) and Mixed_7c
  (max pool: the 2015 TF graph's quirk, FIDInceptionE_2)."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = _BasicConv(320, (1, 1), name='branch1x1')(x)
    b3 = _BasicConv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([_BasicConv(384, **row, name='branch3x3_2a')(b3),
                          _BasicConv(384, **col, name='branch3x3_2b')(b3)], axis=-1)
    bd = _BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = _BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([_BasicConv(384, **row, name='branch3x3dbl_3a')(bd),
                          _BasicConv(384, **col, name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = avg_pool_3x3(x)
    bp = _BasicConv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3 (pytorch-fid's fid_inception_v3): images -> (pool_3, logits).

  Submodule names follow torchvision/pytorch-fid (Conv2d_1a_3x3, Mixed_5b, ..., fc), so
  every converted tensor has an obvious home. No auxiliary head, no dropout (inference).

  Attributes:
    resize: resize inputs to 299x299 first (`resize_bilinear`); False feeds them as they are
      (any size >= 75, e.g. for tests).
    half_pixel_centers: the resize convention: True = pytorch-fid, False = TF1 / tf-gan.
  """
  resize: bool = True
  half_pixel_centers: bool = True

  @nn.compact
  def __call__(self, images):
    """images: [B, H, W, 3] floats in the uint8 range [0, 255] (grey: repeat to 3 channels).

    Returns:
      (pool_3 features [B, 2048], logits [B, 1008]).
    """
    x = jnp.asarray(images, jnp.float32)
    if self.resize:
      x = resize_bilinear(x, 299, self.half_pixel_centers)
    x = x / 127.5 - 1.   # [0, 255] -> [-1, 1], as pytorch-fid's 2 x - 1 on [0, 1]
    x = _BasicConv(32, (3, 3), strides=(2, 2), name='Conv2d_1a_3x3')(x)
    x = _BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = _BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = _BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = _BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = _InceptionA(32, name='Mixed_5b')(x)
    x = _InceptionA(64, name='Mixed_5c')(x)
    x = _InceptionA(64, name='Mixed_5d')(x)
    x = _InceptionB(name='Mixed_6a')(x)
    x = _InceptionC(128, name='Mixed_6b')(x)
    x = _InceptionC(160, name='Mixed_6c')(x)
    x = _InceptionC(160, name='Mixed_6d')(x)
    x = _InceptionC(192, name='Mixed_6e')(x)
    x = _InceptionD(name='Mixed_7a')(x)
    x = _InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = _InceptionE(max_pool=True, name='Mixed_7c')(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    return pool3, nn.Dense(1008, name='fc')(pool3)


def inception_variables_from_torch(state_dict) -> dict:
  """pytorch-fid's state dict (name -> numpy array) -> InceptionV3 variables.

  Conv weights OIHW -> HWIO; BatchNorm weight/bias/running_mean/running_var -> params
  scale/bias and batch_stats mean/var; fc weight [1008, 2048] -> kernel [2048, 1008].
  num_batches_tracked and the unused AuxLogits are dropped; anything else unknown raises.
  """
  params, stats = {}, {}

  def put(tree, path, value):
    for key in path[:-1]:
      tree = tree.setdefault(key, {})
    if path[-1] in tree:
      raise ValueError(f'duplicate tensor for {"/".join(path)}')
    tree[path[-1]] = np.asarray(value, np.float32)

  for name, value in state_dict.items():
    value = np.asarray(value)
    parts = name.split('.')
    if parts[0] == 'AuxLogits' or parts[-1] == 'num_batches_tracked':
      continue
    if parts[0] == 'fc':
      put(params, ['fc', {'weight': 'kernel', 'bias': 'bias'}[parts[1]]],
          value.T if parts[1] == 'weight' else value)
    elif parts[-2] == 'conv' and parts[-1] == 'weight':
      put(params, parts[:-1] + ['kernel'], value.transpose(2, 3, 1, 0))
    elif parts[-2] == 'bn' and parts[-1] in ('weight', 'bias'):
      put(params, parts[:-1] + [{'weight': 'scale', 'bias': 'bias'}[parts[-1]]], value)
    elif parts[-2] == 'bn' and parts[-1] in ('running_mean', 'running_var'):
      put(stats, parts[:-1] + [parts[-1][len('running_'):]], value)
    else:
      raise ValueError(f'unexpected tensor {name!r} {value.shape} in the state dict')
  return {'params': params, 'batch_stats': stats}


def inception_state_dict(variables) -> dict:
  """The inverse of `inception_variables_from_torch` (without num_batches_tracked)."""
  out = {}
  flat = flax.traverse_util.flatten_dict(
      flax.serialization.to_state_dict(variables), sep='.')
  for name, value in flat.items():
    kind, rest = name.split('.', 1)
    prefix, leaf = rest.rsplit('.', 1)
    value = np.asarray(value)
    if prefix == 'fc':
      out[f'fc.{leaf if leaf == "bias" else "weight"}'] = value.T if leaf == 'kernel' else value
    elif leaf == 'kernel':
      out[f'{prefix}.weight'] = value.transpose(3, 2, 0, 1)
    elif kind == 'params':
      out[f'{prefix}.{"weight" if leaf == "scale" else "bias"}'] = value
    else:
      out[f'{prefix}.running_{leaf}'] = value
  return out
