"""Datasets: deterministic, resumable, per-host batches read through TFDS without TensorFlow.

Every dataset is a random-access source (a TFDS array_record data source, or an index over
TFRecord files) wrapped in a `Dataset` whose ``batch(step)`` is a pure function of
(seed, step, shard): a killed run resumes on exactly the batches it would have seen.

* Toy 2-D distributions (``TOY_DISTRIBUTIONS``), scikit-learn's 8x8 digits and 'photos'
  (16x16 colour patches of scikit-learn's two sample photographs) need no network: they are
  generated or copied once into local TFDS datasets (array_record) under ``data_dir`` on
  first use.
* ``cifar10``, ``celeb_a``, ``lsun/<category>``, ``svhn_cropped``, ``mnist``, ``fashion_mnist``
  are read with ``tfds.data_source`` and must have been prepared in the array_record format.
  Preparing needs the network and TensorFlow once (TFDS encodes images with it), on any
  machine; training then needs neither:

      pip install tensorflow tensorflow-datasets
      tfds build cifar10 --file_format=array_record --data_dir=$SCORE_SDE_DATA_DIR

  (an existing TFRecord preparation converts with ``tfds convert_format
  --out_file_format=array_record``; celeb_a and lsun may need a manual download, see their
  TFDS catalog pages).
* ``ffhq`` and ``celebahq`` come from the TFRecord files of the reference (ProGAN/StyleGAN
  ``dataset_tool.py``: one ``tf.train.Example`` per image with features 'shape' = [C, H, W]
  int64 and 'data' = the raw uint8 bytes in CHW order), passed as ``tfrecords_path``.

Image preprocessing follows the reference, in numpy on uint8 images: centre crop (celeb_a:
140x140, then resize to 64; lsun: the central square), bicubic resize with PIL (antialiased
when shrinking, rounded back to uint8), random horizontal flip, then either x / 255 or uniform
dequantization (x + u) / 256 with u ~ U[0, 1), then optional centering to [-1, 1]. Resizing
before the float conversion keeps the data on the 8-bit grid, so dequantized values stay
inside their bins and bits/dim remain meaningful.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import io
import numbers
import operator
import os
import struct
import sys
import zlib
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

import gaussian_mixture

DATA_DIR_ENV = 'SCORE_SDE_DATA_DIR'

# Random-stream tags: the per-epoch order and the per-step augmentation never share a seed.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def scaler(centered: bool) -> Callable:
  """Data in [0, 1] -> the model's range: [-1, 1] when ``centered``, else unchanged."""
  if centered:
    return lambda x: x * 2. - 1.
  return lambda x: x


def to_unit_range(x, centered: bool) -> np.ndarray:
  """Images in the model's range to [0, 1] for display and fidelity, clipped (samples overshoot)."""
  return np.clip(np.asarray(inverse_scaler(centered)(np.asarray(x))), 0, 1)


def inverse_scaler(centered: bool) -> Callable:
  """The inverse of ``scaler(centered)``: the model's range -> [0, 1]."""
  if centered:
    return lambda x: (x + 1.) / 2.
  return lambda x: x


# ----------------------------------------------------------------------------- toy 2-D data


def _sample_gaussian_mixture(rng: np.random.Generator, n: int) -> np.ndarray:
  mix = gaussian_mixture.two_dimensional_example()
  weights = np.asarray(mix.weights, np.float64)
  comp = rng.choice(len(weights), size=n, p=weights / weights.sum())
  chol = np.linalg.cholesky(np.asarray(mix.covs, np.float64))            # [K, 2, 2]
  z = rng.standard_normal((n, 2))
  x = np.asarray(mix.means, np.float64)[comp] + np.einsum('nde,ne->nd', chol[comp], z)
  return x.astype(np.float32)


# The 8 unit squares (lower-left corners) of [-2, 2]^2 whose floor coordinates sum to an
# even number: a 4x4 board with density 1/8 on its black squares.
_CHECKERBOARD_CELLS = np.array(
    [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0], np.float64)


def _sample_checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
  cells = _CHECKERBOARD_CELLS[rng.integers(len(_CHECKERBOARD_CELLS), size=n)]
  return (cells + rng.random((n, 2))).astype(np.float32)


def _sample_two_moons(rng: np.random.Generator, n: int) -> np.ndarray:
  """Two interleaved half circles, centred and scaled by 2, noise std 0.1."""
  t = np.pi * rng.random(n)
  upper = np.stack([np.cos(t), np.sin(t)], axis=-1)
  lower = np.stack([1. - np.cos(t), 0.5 - np.sin(t)], axis=-1)
  x = np.where((rng.random(n) < 0.5)[:, None], upper, lower)
  x = 2. * (x - np.array([0.5, 0.25])) + 0.1 * rng.standard_normal((n, 2))
  return x.astype(np.float32)


def _sample_swiss_roll(rng: np.random.Generator, n: int) -> np.ndarray:
  """The spiral (t cos t, t sin t) / 5, t ~ U[1.5 pi, 4.5 pi], noise std 0.1."""
  t = 1.5 * np.pi * (1. + 2. * rng.random(n))
  x = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / 5.
  return (x + 0.1 * rng.standard_normal((n, 2))).astype(np.float32)


def _sample_rings(rng: np.random.Generator, n: int) -> np.ndarray:
  """Four concentric circles of radii 0.75, 1.5, 2.25, 3 (equal mass), noise std 0.08."""
  r = np.array([0.75, 1.5, 2.25, 3.0])[rng.integers(4, size=n)]
  angle = 2. * np.pi * rng.random(n)
  x = r[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
  return (x + 0.08 * rng.standard_normal((n, 2))).astype(np.float32)


# name -> sampler(rng: np.random.Generator, n) -> float32 [n, 2]
TOY_DISTRIBUTIONS = {
    'gaussian_mixture': _sample_gaussian_mixture,
    'checkerboard': _sample_checkerboard,
    'two_moons': _sample_two_moons,
    'swiss_roll': _sample_swiss_roll,
    'rings': _sample_rings,
}

# Fixed sizes of the stored toy splits.
TOY_SPLITS = {'train': 50_000, 'test': 10_000}


def _checkerboard_log_prob(x):
  x = jnp.asarray(x)
  inside = jnp.all((x >= -2.) & (x < 2.), axis=-1)
  black = jnp.sum(jnp.floor(x), axis=-1) % 2 == 0
  return jnp.where(inside & black, -jnp.log(8.), -jnp.inf)


def toy_log_prob(name: str) -> Callable | None:
  """The true log-density ``log_prob(x [batch, 2]) -> [batch]`` of a dataset, where known.

  Known for 'gaussian_mixture' (gaussian_mixture.two_dimensional_example()) and
  'checkerboard' (1/8 on its squares, -inf elsewhere); None for the other toy distributions
  and for every image dataset. An unknown name raises ValueError.
  """
  if name not in TOY_DISTRIBUTIONS and not name.startswith('lsun/'):
    _check_name(name, valid_names(), 'dataset')
  if name == 'gaussian_mixture':
    mix = gaussian_mixture.two_dimensional_example()
    return lambda x: mix.log_prob(jnp.asarray(x, jnp.float32))
  if name == 'checkerboard':
    return _checkerboard_log_prob
  return None


def toy_sample(name: str, n: int, *, seed: int = 0) -> np.ndarray:
  """n fresh samples of a toy distribution, float32 [n, 2] (reference samples for metrics)."""
  _check_name(name, TOY_DISTRIBUTIONS, 'toy distribution')
  return TOY_DISTRIBUTIONS[name](np.random.default_rng(seed), n)


class _Toy2D(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Fixed train/test samples of each toy distribution (one builder config per distribution)."""
  name = 'score_sde_toy_2d'
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in TOY_DISTRIBUTIONS]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Samples of a 2-D toy distribution, generated from fixed seeds.',
        features=tfds.features.FeaturesDict(
            {'x': tfds.features.Tensor(shape=(2,), dtype=np.float32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(i, n) for i, (split, n) in enumerate(TOY_SPLITS.items())}

  def _generate_examples(self, split_index, n):
    name = self.builder_config.name
    rng = np.random.default_rng([zlib.crc32(name.encode()), split_index])
    for i, x in enumerate(TOY_DISTRIBUTIONS[name](rng, n)):
      yield i, {'x': x}


# ----------------------------------------------------------------------------- digits

DIGITS_TEST_SIZE = 297   # of sklearn's 1797: 1500 train / 297 test, stratified, seed 0


class _Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """scikit-learn's 8x8 digits as uint8 [8, 8, 1] images, pixel = round(v * 255 / 16)."""
  name = 'score_sde_sklearn_digits'
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='sklearn.datasets.load_digits, 17 grey levels mapped to 0..255.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    import sklearn.datasets  # only needed to build, once
    import sklearn.model_selection
    digits = sklearn.datasets.load_digits()
    images = np.round(digits.images * (255. / 16.)).astype(np.uint8)[..., None]
    index = np.arange(len(images))
    train, test = sklearn.model_selection.train_test_split(
        index, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=0)
    return {split: self._generate_examples(images, digits.target, idx)
            for split, idx in (('train', train), ('test', test))}

  def _generate_examples(self, images, labels, index):
    for i in index:   # keys: row of load_digits
      yield int(i), {'image': images[i], 'label': int(labels[i])}


# ----------------------------------------------------------------------------- photos

# Colour patches of scikit-learn's two bundled photographs (china.jpg, flower.jpg, 427x640):
# each photo is downscaled to PHOTOS_DOWNSCALED (width, height) with PIL's bicubic filter
# (antialiased), cut into PHOTOS_BLOCK x PHOTOS_BLOCK blocks (the last partial row and column
# of blocks dropped), and every PHOTOS_SIZE x PHOTOS_SIZE patch inside a block at stride
# PHOTOS_STRIDE is an example. Blocks, not patches, are split: the blocks with
# (row + column) % 5 == 2 are the test split, so no test patch overlaps a training patch.
PHOTOS_FILES = ('china.jpg', 'flower.jpg')
PHOTOS_DOWNSCALED = (160, 107)
PHOTOS_BLOCK, PHOTOS_SIZE, PHOTOS_STRIDE = 32, 16, 2
PHOTOS_SPLITS = {'train': 1944, 'test': 486}   # 24 and 6 blocks of 81 patches


def photo_patches():
  """{'train', 'test'}: (uint8 [n, 16, 16, 3] patches, int32 [n] photo index), in a fixed order."""
  import sklearn.datasets  # only needed to build, once
  photos = sklearn.datasets.load_sample_images()
  by_name = {os.path.basename(f): im for f, im in zip(photos.filenames, photos.images)}
  out = {'train': ([], []), 'test': ([], [])}
  starts = range(0, PHOTOS_BLOCK - PHOTOS_SIZE + 1, PHOTOS_STRIDE)
  for index, name in enumerate(PHOTOS_FILES):
    small = np.asarray(Image.fromarray(by_name[name]).resize(PHOTOS_DOWNSCALED,
                                                             Image.Resampling.BICUBIC))
    rows, cols = small.shape[0] // PHOTOS_BLOCK, small.shape[1] // PHOTOS_BLOCK
    for r in range(rows):
      for c in range(cols):
        images, labels = out['test' if (r + c) % 5 == 2 else 'train']
        top, left = r * PHOTOS_BLOCK, c * PHOTOS_BLOCK
        block = small[top:top + PHOTOS_BLOCK, left:left + PHOTOS_BLOCK]
        for i in starts:
          for j in starts:
            images.append(block[i:i + PHOTOS_SIZE, j:j + PHOTOS_SIZE])
            labels.append(index)
  return {split: (np.stack(images), np.asarray(labels, np.int32))
          for split, (images, labels) in out.items()}


class _Photos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """16x16 RGB patches of scikit-learn's sample photographs (``photo_patches``)."""
  name = 'score_sde_sklearn_photos'
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Patches of sklearn.datasets.load_sample_images (china.jpg, flower.jpg), '
                    'downscaled 4x; test blocks disjoint from training blocks.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(PHOTOS_SIZE, PHOTOS_SIZE, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=[f[:-4] for f in PHOTOS_FILES]),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(*data) for split, data in photo_patches().items()}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}


@contextlib.contextmanager
def _tfds_warnings_off():
  from absl import logging
  before = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(before)


def _prepare_quietly(builder):
  """Generates a local dataset with one line of output instead of TFDS's "Downloading and
  preparing dataset Unknown size" and its progress bars (shown only if generation fails)."""
  name = builder.name + (f'/{builder.builder_config.name}' if builder.builder_config else '')
  print(f'Generating the embedded dataset {name} in {builder.data_dir} (once; later runs read '
        'it).', file=sys.stderr, flush=True)
  captured = io.StringIO()
  try:
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
      builder.download_and_prepare()
  except BaseException:
    sys.stderr.write(captured.getvalue())
    raise


def _local_source(builder_cls, config, split, data_dir):
  """Builds a local TFDS dataset on first use and returns its array_record data source."""
  with _tfds_warnings_off():   # "Variant folder ... has no dataset_info.json": not built yet
    builder = builder_cls(config=config, data_dir=data_dir, file_format='array_record')
    prepared = builder.is_prepared()
  try:
    if not prepared:
      _prepare_quietly(builder)
  except FileExistsError:
    # Several processes on one disk prepared it at once and another one renamed its copy
    # into place first. Generation is seeded, so that copy is the same data: use it.
    builder = builder_cls(config=config, data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
      raise
  return builder.as_data_source(split)


# ----------------------------------------------------------------------------- TFRecord


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):   # reflected Castagnoli polynomial
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: crc32c, rotated right by 15 bits plus a constant."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class _TFRecordImages:
  """Random access to the images of TFRecord files in the reference's layout.

  A TFRecord is uint64 length, masked crc32c(length), data, masked crc32c(data), little endian.
  Opening indexes every record (reading only the 12-byte headers, whose checksums are
  verified); the data checksums are not (pure-Python crc32c of megabyte images is too slow).
  """

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)
    index = []
    for f, path in enumerate(self._paths):
      size = os.path.getsize(path)
      with open(path, 'rb') as fh:
        offset = 0
        while offset < size:
          fh.seek(offset)
          header = fh.read(12)
          length, crc = struct.unpack('<QI', header) if len(header) == 12 else (None, None)
          if length is None or _masked_crc32c(header[:8]) != crc:
            raise ValueError(f'{path}: not a TFRecord file (bad record header at byte {offset})')
          if offset + 16 + length > size:
            raise ValueError(f'{path}: truncated record at byte {offset}')
          index.append((f, offset + 12, length))
          offset += 16 + length
    if not index:
      raise ValueError(f'no records in {self._paths}')
    self._index = np.asarray(index, np.int64)

  def __len__(self):
    return len(self._index)

  def __getitem__(self, i):
    f, offset, length = self._index[i]
    with open(self._paths[f], 'rb') as fh:
      fh.seek(offset)
      example = tf_example_pb2.Example.FromString(fh.read(length))
    feature = example.features.feature
    shape = tuple(feature['shape'].int64_list.value)                # [C, H, W]
    chw = np.frombuffer(feature['data'].bytes_list.value[0], np.uint8).reshape(shape)
    return {'image': chw.transpose(1, 2, 0)}


def _tfrecord_paths(tfrecords_path) -> list[str]:
  if tfrecords_path is None:
    raise ValueError('tfrecords_path is required for ffhq and celebahq (the reference\'s '
                     '.tfrecords file, e.g. ffhq-r10.tfrecords)')
  patterns = [tfrecords_path] if isinstance(tfrecords_path, (str, os.PathLike)) else tfrecords_path
  paths = sorted(p for pattern in patterns for p in glob.glob(os.path.expanduser(str(pattern))))
  if not paths:
    raise FileNotFoundError(f'tfrecords_path matches no file: {tfrecords_path!r}')
  return paths


# ----------------------------------------------------------------------------- images


@dataclasses.dataclass(frozen=True)
class _ImageSpec:
  """How one image dataset is read and cropped.

  splits: the valid split names. image_size: the default output size (None: as stored).
  crop: an int for a centred crop of that size, 'square' for the central square, or None.
  labels: whether batches carry 'label'.
  """
  splits: tuple[str, ...]
  image_size: int | None
  crop: int | str | None = None
  labels: bool = False


_TFDS_IMAGES = {
    'cifar10': _ImageSpec(('train', 'test'), 32, labels=True),
    'svhn_cropped': _ImageSpec(('train', 'test', 'extra'), 32, labels=True),
    'mnist': _ImageSpec(('train', 'test'), 28, labels=True),
    'fashion_mnist': _ImageSpec(('train', 'test'), 28, labels=True),
    'celeb_a': _ImageSpec(('train', 'validation', 'test'), 64, crop=140),
    'lsun': _ImageSpec(('train', 'validation'), 256, crop='square'),
}
_TFRECORD_IMAGES = {
    'ffhq': _ImageSpec(('train',), None, crop='square'),
    'celebahq': _ImageSpec(('train',), None, crop='square'),
}
_DIGITS = _ImageSpec(('train', 'test'), 8, labels=True)
_PHOTOS = _ImageSpec(('train', 'test'), PHOTOS_SIZE, labels=True)


# The image datasets made offline from scikit-learn's bundled data: name -> (builder, spec).
_EMBEDDED_IMAGES = {'digits': (_Digits, _DIGITS), 'photos': (_Photos, _PHOTOS)}


def _lsun_categories() -> list[str]:
  return [c.name for c in tfds.builder_cls('lsun').BUILDER_CONFIGS]


def _crop_resize(image: np.ndarray, crop, size: int | None) -> np.ndarray:
  """uint8 [H, W, C] -> centre-cropped, bicubic-resized uint8 [size, size, C]."""
  h, w = image.shape[:2]
  side = crop if isinstance(crop, int) else min(h, w) if crop == 'square' else None
  if side is not None and (side, side) != (h, w):
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
  if size is not None and image.shape[:2] != (size, size):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil = pil.resize((size, size), Image.Resampling.BICUBIC)   # antialiased when shrinking
    image = np.asarray(pil).reshape(size, size, image.shape[-1])
  return image


def _decode_images(examples, *, crop, size, labels):
  """examples (dicts with uint8 'image') -> {'image': uint8 [b, size, size, C], 'label'}: the
  deterministic part of preprocessing, done once per example when the data fit in memory."""
  out = {'image': np.stack([_crop_resize(np.asarray(e['image']), crop, size) for e in examples])}
  if labels:
    out['label'] = np.asarray([e['label'] for e in examples], np.int32)
  return out


def _augment_images(decoded, rng, *, random_flip, uniform_dequantization, centered):
  """Decoded uint8 images and a numpy Generator -> a batch of float32 images (labels kept)."""
  images = decoded['image']
  if random_flip:
    flip = rng.random(len(images)) < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  if uniform_dequantization:
    # (x * 255 + u) / 256, u ~ U[0, 1). u lives on a 2^-16 grid so that v + u (< 2^8) is
    # exact in float32: values never round up into the next bin [v/256, (v+1)/256).
    u = rng.integers(0, 2**16, images.shape).astype(np.float32) / 2**16
    x = (images.astype(np.float32) + u) / 256.
  else:
    x = images.astype(np.float32) / 255.
  batch = {'image': scaler(centered)(x).astype(np.float32)}
  if 'label' in decoded:
    batch['label'] = decoded['label']
  return batch


def _toy_decode(examples):
  return {'x': np.stack([np.asarray(e['x'], np.float32) for e in examples])}


def _no_augment(decoded, rng):
  del rng
  return dict(decoded)


# ----------------------------------------------------------------------------- Dataset


def _supports_batched_reads(source) -> bool:
  """Whether ``source.__getitems__`` works (several times faster than item by item).

  The data sources of tfds.testing.mock_data break it (tfds 4.9.10): probe once.
  """
  if not hasattr(source, '__getitems__'):
    return False
  try:
    source.__getitems__([0])
  except TypeError:
    return False
  return True


class Dataset:
  """One host's batches of one split, a pure function of (seed, step, shard).

  Host ``shard_index`` of ``shard_count`` owns the contiguous block of ``shard_size =
  num_examples // shard_count`` examples starting at ``shard_index * shard_size`` (the last
  ``num_examples % shard_count`` are never read). Epoch e visits its block in the order
  ``np.random.default_rng([seed, 0, e]).permutation(shard_size)`` (identity without shuffling),
  ``batch_size`` examples per step; flips and dequantization noise of a step come from
  ``default_rng([seed, 1, step, shard_index])``.

  Preprocessing is split in two: ``decode`` (read, crop, resize: the same every time an
  example is seen) and ``augment`` (flip, dequantize, scale: drawn per step). When this host's
  decoded block fits ``memory_budget_bytes``, each example is decoded the first time a batch
  needs it and then served from memory: after one epoch the source is never read again. Both
  paths give the same batches, bit for bit.

  Attributes:
    num_examples: examples in the split (all hosts together).
    shard_size: examples owned by this host.
    batch_size: examples per batch on this host (the global batch is shard_count times that).
    steps_per_epoch: batches per epoch (the same on every host).
    num_steps: steps in total, or None when repeating forever.
    data_shape: the shape of one example: (H, W, C) for images, (2,) for toy data.
    in_memory: whether decoded examples are kept in memory.
  """

  def __init__(self, source, decode, augment, *, data_key, batch_size, shard_index, shard_count,
               seed, num_epochs, shuffle, drop_remainder, memory_budget_bytes=0):
    self._source = source
    self._decode = decode
    self._augment = augment
    self._seed = seed
    self._shuffle = shuffle
    self._shard_index = shard_index
    self.num_examples = len(source)
    self.shard_size = self.num_examples // shard_count
    self.batch_size = batch_size
    if drop_remainder:
      self.steps_per_epoch = self.shard_size // batch_size
    else:
      self.steps_per_epoch = -(-self.shard_size // batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'batch_size={batch_size} is larger than the data: {self.num_examples} examples '
          f'over {shard_count} shard(s) give {self.shard_size} per shard')
    self.num_steps = None if num_epochs is None else num_epochs * self.steps_per_epoch
    self._start = shard_index * self.shard_size
    self._batched = _supports_batched_reads(source)
    self._order_cache = (None, None)
    first = decode(self._read(np.array([self._start])))
    self.data_shape = first[data_key].shape[1:]
    self.decoded_bytes = self.shard_size * sum(v[0].nbytes for v in first.values())
    self.in_memory = self.decoded_bytes <= memory_budget_bytes
    if self.in_memory:
      self._memory = {k: np.zeros((self.shard_size,) + v.shape[1:], v.dtype) for k, v in first.items()}
      self._decoded = np.zeros(self.shard_size, bool)

  def _order(self, epoch: int) -> np.ndarray:
    if self._order_cache[0] != epoch:
      if self._shuffle:
        rng = np.random.default_rng([self._seed, _ORDER_STREAM, epoch])
        order = rng.permutation(self.shard_size)
      else:
        order = np.arange(self.shard_size)
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  def _read(self, index: np.ndarray) -> list:
    """The examples at ``index``, read in increasing order (faster) and returned in ``index``'s."""
    sort = np.argsort(index, kind='stable')
    if self._batched:
      items = self._source.__getitems__([int(i) for i in index[sort]])
    else:
      items = [self._source[int(i)] for i in index[sort]]
    out = [None] * len(index)
    for position, item in zip(sort, items):
      out[position] = item
    return out

  def _decoded_examples(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """The decoded examples at positions ``index`` of this host's block."""
    if not self.in_memory:
      return self._decode(self._read(self._start + index))
    missing = np.unique(index[~self._decoded[index]])
    if missing.size:
      for k, v in self._decode(self._read(self._start + missing)).items():
        self._memory[k][missing] = v
      self._decoded[missing] = True
    return {k: v[index] for k, v in self._memory.items()}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch of global training step ``step`` (random access; resuming needs only step)."""
    step = operator.index(step)   # also numpy and concrete JAX integer scalars
    if step < 0 or (self.num_steps is not None and step >= self.num_steps):
      raise IndexError(f'step {step} outside [0, {self.num_steps})')
    epoch, i = divmod(step, self.steps_per_epoch)
    b = self.batch_size
    index = self._order(epoch)[i * b:(i + 1) * b]
    rng = np.random.default_rng([self._seed, _AUGMENT_STREAM, step, self._shard_index])
    return self._augment(self._decoded_examples(index), rng)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    step = 0
    while self.num_steps is None or step < self.num_steps:
      yield self.batch(step)
      step += 1


# ----------------------------------------------------------------------------- get_dataset


def is_known_dataset(name: str) -> bool:
  """Whether get_dataset knows ``name`` (an LSUN category is checked when it is loaded)."""
  return (name in TOY_DISTRIBUTIONS or name in _EMBEDDED_IMAGES or name.startswith('lsun/')
          or (name in _TFDS_IMAGES and name != 'lsun') or name in _TFRECORD_IMAGES)


def valid_names() -> list[str]:
  return sorted([*TOY_DISTRIBUTIONS, *_EMBEDDED_IMAGES, *(n for n in _TFDS_IMAGES if n != 'lsun'),
                 'lsun/<category>', *_TFRECORD_IMAGES])


def _check_name(name, valid, what):
  if name not in valid:
    raise ValueError(f'unknown {what} {name!r}; valid: {", ".join(sorted(valid))}')


def _check_split(name, split, splits, allow_slicing=True):
  base = split.split('[')[0] if allow_slicing else split
  if base not in splits:
    slicing = " (or a TFDS slice such as 'train[:90%]')" if allow_slicing else ''
    raise ValueError(
        f'split={split!r} is not a split of {name}: use one of {list(splits)}{slicing}')


def _tfds_source(name, split, data_dir):
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, FileNotFoundError, AssertionError) as e:
    raise FileNotFoundError(
        f'{name} is not prepared in the array_record format under '
        f'{data_dir or "the TFDS default data_dir"}. Prepare it once, with network and '
        f'TensorFlow: `tfds build {name} --file_format=array_record --data_dir=DIR` '
        f'(see the datasets.py docstring).') from e


def get_dataset(name: str, *, split: str, batch_size: int, image_size: int | None = None,
                centered: bool = False, random_flip: bool = False,
                uniform_dequantization: bool = False, data_dir: str | None = None,
                seed: int = 0, num_epochs: int | None = None, shuffle: bool = True,
                drop_remainder: bool = True, shard_index: int | None = None,
                shard_count: int | None = None,
                tfrecords_path: str | Sequence[str] | None = None,
                memory_budget_mb: float = 1024) -> Dataset:
  """This host's deterministic batches of a dataset.

  Args:
    name: a toy distribution (TOY_DISTRIBUTIONS: batches {'x': float32 [b, 2]}), 'digits',
      'photos', 'cifar10', 'celeb_a', 'lsun/<category>', 'svhn_cropped', 'mnist',
      'fashion_mnist', 'ffhq' or 'celebahq' (batches {'image': float32 [b, H, W, C]} plus
      int32 'label' [b] for digits, photos (which photograph), cifar10, svhn_cropped, mnist,
      fashion_mnist).
    split: 'train', 'test', ... (TFDS slices such as 'train[:90%]' too, except for ffhq and
      celebahq, which have only 'train').
    batch_size: examples per batch on this host (per-host, not global).
    image_size: output height and width (default: 32 cifar10/svhn, 28 mnist, 64 celeb_a,
      256 lsun, 8 digits, 16 photos, as stored for ffhq/celebahq).
    centered: map images to [-1, 1] instead of [0, 1].
    random_flip: flip each image left-right with probability 1/2.
    uniform_dequantization: (x * 255 + u) / 256, u ~ U[0, 1), instead of x.
    data_dir: where TFDS datasets live and local ones are built; default $SCORE_SDE_DATA_DIR,
      else TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    seed: a non-negative int fixing the order and the augmentations.
    num_epochs: stop after this many epochs; None repeats forever.
    shuffle: visit each epoch in a seeded random order (else in stored order).
    drop_remainder: drop the last incomplete batch of each epoch (else it comes out smaller).
    shard_index, shard_count: this host's shard; default jax.process_index() / process_count().
    tfrecords_path: ffhq/celebahq only: a file, glob pattern or list of them.
    memory_budget_mb: keep decoded examples in memory (decoded once, then served from there)
      when this host's share of the split takes at most this many MiB decoded (uint8 images
      after crop and resize; 2 float32 per toy point); 0 always reads the source.

  Returns:
    A `Dataset`: ``.batch(step)`` for any step, iteration from step 0, ``num_examples``,
    ``steps_per_epoch`` and ``data_shape``.
  """
  if not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
  if not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  if num_epochs is not None and (not isinstance(num_epochs, numbers.Integral) or num_epochs <= 0):
    raise ValueError(f'num_epochs must be None or a positive int, got {num_epochs!r}')
  if image_size is not None and (not isinstance(image_size, numbers.Integral) or image_size <= 0):
    raise ValueError(f'image_size must be None or a positive int, got {image_size!r}')
  shard_count = jax.process_count() if shard_count is None else shard_count
  shard_index = jax.process_index() if shard_index is None else shard_index
  if not isinstance(shard_count, numbers.Integral) or shard_count <= 0:
    raise ValueError(f'shard_count must be a positive int, got {shard_count!r}')
  if not isinstance(shard_index, numbers.Integral) or not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index must be in [0, {shard_count}), got {shard_index!r}')
  if not isinstance(split, str):
    raise ValueError(f'split must be a string, got {split!r}')
  if (isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, numbers.Real)
      or not memory_budget_mb >= 0):
    raise ValueError(f'memory_budget_mb must be a number >= 0, got {memory_budget_mb!r}')
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
  image_options = dict(centered=centered, random_flip=random_flip,
                       uniform_dequantization=uniform_dequantization)

  if name in TOY_DISTRIBUTIONS:
    used = [k for k, v in dict(image_size=image_size, **image_options).items() if v]
    if used:
      raise ValueError(f'{", ".join(used)} apply to image datasets, not to toy data {name!r}')
    _check_split(name, split, TOY_SPLITS)
    source = _local_source(_Toy2D, name, split, data_dir)
    decode, augment, data_key = _toy_decode, _no_augment, 'x'
  else:
    is_lsun = name.startswith('lsun/')
    if name in _EMBEDDED_IMAGES:
      builder_cls, spec = _EMBEDDED_IMAGES[name]
      _check_split(name, split, spec.splits)
      source = _local_source(builder_cls, None, split, data_dir)
    elif is_lsun or (name in _TFDS_IMAGES and name != 'lsun'):
      spec = _TFDS_IMAGES['lsun' if is_lsun else name]
      if is_lsun:
        _check_name(name.split('/', 1)[1], _lsun_categories(), 'lsun category')
      _check_split(name, split, spec.splits)
      source = _tfds_source(name, split, data_dir)
    elif name in _TFRECORD_IMAGES:
      spec = _TFRECORD_IMAGES[name]
      _check_split(name, split, spec.splits, allow_slicing=False)
      source = _TFRecordImages(_tfrecord_paths(tfrecords_path))
    else:
      raise ValueError(f'unknown dataset {name!r}; valid: {", ".join(valid_names())}')
    size = spec.image_size if image_size is None else int(image_size)
    # Partials of module functions: a Dataset pickles, for worker processes.
    decode = functools.partial(_decode_images, crop=spec.crop, size=size, labels=spec.labels)
    augment = functools.partial(_augment_images, **image_options)
    data_key = 'image'
  return Dataset(source, decode, augment, data_key=data_key, batch_size=int(batch_size),
                 shard_index=int(shard_index), shard_count=int(shard_count), seed=int(seed),
                 num_epochs=None if num_epochs is None else int(num_epochs), shuffle=shuffle,
                 drop_remainder=drop_remainder,
                 memory_budget_bytes=int(memory_budget_mb * 2**20))
