"""Sample-quality metrics: FID, KID and Inception Score, with the networks that embed images.

Metrics work on feature or logit arrays and follow the usual conventions:

* FID (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with unbiased
  (ddof = 1) covariances as in tf-gan and pytorch-fid. Statistics accumulate in float64.
* KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets; mean and std over the subsets.
* IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))). By default over all samples at
  once (one split), as tf-gan's classifier_score_from_logits that the reference used; with
  ``splits`` > 1, the mean and std over that many equal parts (the original paper's 10,
  which gives systematically lower numbers).
* Samples are quantized to uint8 as the reference does, clip(255 x, 0, 255) cast to uint8
  (a floor: `SAMPLE_QUANTIZATION`); real images, stored on the k/255 grid, are rounded
  back to k (a floor would lose a level to float error after centering).

Embedding networks:

* `InceptionEvaluator`: models/inception.InceptionV3, the FID Inception network (the 2015
  TensorFlow graph used by tf-gan, ported as pytorch-fid's FIDInception* blocks and
  clean-fid's legacy mode): pool_3 features
  [B, 2048] and logits [B, 1008]. Its weights are never random in a reported number: they are
  converted from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` by
  ``scripts/convert_inception_weights.py`` and loaded with `load_inception_variables`.
* `DigitsEvaluator`: models/digits_classifier.py, a small CNN trained on the 8x8 digits
  train split (the committed
  ``assets/digits_classifier.msgpack``, see ``scripts/train_digits_classifier.py``): 64-d
  penultimate features and 10 logits, so that digits-FID/KID/IS run offline.

Baselines for digits: `fit_gaussian`/`sample_gaussian` (a full-covariance Gaussian fitted to
the training pixels, the 'ceiling') and the held-out test digits (`load_digits`, the 'floor').
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Iterable, NamedTuple

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

import likelihood
from models.digits_classifier import DigitsClassifier
from models.inception import InceptionV3, resize_bilinear

INCEPTION_WEIGHTS_ENV = 'SCORE_SDE_INCEPTION_WEIGHTS'
# pytorch-fid's weights (a port of TF's 2015-12-05 Inception graph): the one source the
# converter accepts and the loader trusts. torch.hub names the file by the first 8 hex digits of
# its sha256; the full hash and size are those published with the file (torch-fidelity ships
# the same bytes as weights-inception-2015-12-05-6726825d.pth).
PYTORCH_FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/'
                           'fid_weights/pt_inception-2015-12-05-6726825d.pth')
PYTORCH_FID_WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
PYTORCH_FID_WEIGHTS_BYTES = 95_628_359

# The FID network's input size and the images per call. Tests of the plumbing lower them (the
# size to 75, the smallest the network takes) to run fast on a CPU; every reported number
# uses 299.
INCEPTION_IMAGE_SIZE = 299
INCEPTION_BATCH_SIZE = 250

DIGITS_CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets',
                                      'digits_classifier.msgpack')

_MISSING_WEIGHTS = f"""\
Inception weights not found{{where}}. FID/KID/IS need the real FID Inception weights (never
random ones). Get them once, on a machine with network access and torch installed:
  wget {PYTORCH_FID_WEIGHTS_URL}
  python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth \\
      inception_fid.msgpack
then pass the .msgpack file's path (its .sha256 file next to it) as weights_path or set
${INCEPTION_WEIGHTS_ENV}."""


# ----------------------------------------------------------------------------- metrics


class FeatureStatistics:
  """Streaming mean and covariance of features, accumulated in float64.

  Sums are taken about a shift (the first batch's mean) so that the covariance does not lose
  digits to cancellation when the mean is large compared with the spread.
  """

  def __init__(self):
    self.n = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, features) -> 'FeatureStatistics':
    """Adds a batch of features [b, d] (or [b, ...], flattened)."""
    x = np.asarray(features, np.float64)
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] == 0:
      return self
    if self._shift is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((x.shape[1], x.shape[1]))
    x = x - self._shift
    self.n += x.shape[0]
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x
    return self

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu [d], sigma [d, d]) in float64; sigma is the unbiased (ddof = 1) covariance."""
    if self.n < 2:
      raise ValueError(f'need at least 2 feature vectors, got {self.n}')
    mean = self._sum / self.n
    sigma = (self._outer - self.n * np.outer(mean, mean)) / (self.n - 1)
    return self._shift + mean, (sigma + sigma.T) / 2.


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance of features, as tf-gan and pytorch-fid compute them.

  Args:
    features: an array [n, d], or an iterable of batches [b, d] (never held all at once).

  Returns:
    (mu [d], sigma [d, d]), float64.
  """
  stats = FeatureStatistics()
  if isinstance(features, (np.ndarray, jax.Array)):
    return stats.update(features).result()
  for batch in features:
    stats.update(batch)
  return stats.result()


def _symmetric_sqrt(a: np.ndarray) -> np.ndarray:
  """The PSD square root of a symmetric PSD matrix, eigenvalues clipped at 0."""
  w, v = np.linalg.eigh((a + a.T) / 2.)
  return (v * np.sqrt(np.clip(w, 0., None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on features).

  d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

  The trace term uses tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): S1 S2 has the
  eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so two symmetric
  eigendecompositions (float64, eigenvalues clipped at 0) replace scipy.linalg.sqrtm of the
  non-symmetric product. This needs no eps * I retry when the product is singular (n < d
  samples) and never yields complex parts; where sqrtm converges the two agree to ~1e-8
  relative.

  Args:
    mu1, mu2: means [d]. sigma1, sigma2: covariances [d, d].

  Returns:
    The distance (squared, as FID is reported) as a Python float.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'shapes differ: {mu1.shape} vs {mu2.shape}, '
                     f'{sigma1.shape} vs {sigma2.shape}')
  root1 = _symmetric_sqrt(sigma1)
  product = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((product + product.T) / 2.)
  trace_sqrt = np.sqrt(np.clip(eig, 0., None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2. * trace_sqrt)


@jax.jit
def _polynomial_kernel_sums(x, y):
  """Row sums and diagonals of k(x, x), k(y, y), k(x, y) with k = (x.y / d + 1)^3."""
  d = x.shape[-1]
  dot = lambda a, b: jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  k_xx = (dot(x, x) / d + 1.) ** 3
  k_yy = (dot(y, y) / d + 1.) ** 3
  k_xy = (dot(x, y) / d + 1.) ** 3
  return (k_xx.sum(1), jnp.diagonal(k_xx), k_yy.sum(1), jnp.diagonal(k_yy), k_xy.sum(1))


def kernel_inception_distance(features1, features2, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """KID: the unbiased MMD^2 of a cubic polynomial kernel, averaged over random subsets.

  Binkowski et al. 2018 (and tf-gan, clean-fid): for each subset, m rows of each set drawn
  without replacement, k(x, y) = (x.y / d + 1)^3 and
  MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
          - 2 sum_{i, j} k(x_i, y_j) / m^2.
  The kernel matrices are computed with jax (float32 matmuls at full precision, row sums of
  m terms); the sums over rows and the estimator are float64.

  Args:
    features1, features2: [n1, d], [n2, d].
    num_subsets: number of random subsets.
    subset_size: m, capped at min(n1, n2) (with fewer samples, every subset is all of them
      for the smaller set).
    seed: seeds the subset draws (numpy Generator).

  Returns:
    (mean, std) of MMD^2 over the subsets.
  """
  f1, f2 = np.asarray(features1, np.float32), np.asarray(features2, np.float32)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f'need features [n1, d] and [n2, d], got {f1.shape} and {f2.shape}')
  m = min(subset_size, len(f1), len(f2))
  if m < 2:
    raise ValueError(f'need at least 2 samples in each set, got {len(f1)} and {len(f2)}')
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    x = f1[rng.choice(len(f1), m, replace=False)]
    y = f2[rng.choice(len(f2), m, replace=False)]
    sums = [np.asarray(s, np.float64) for s in _polynomial_kernel_sums(x, y)]
    xx_rows, xx_diag, yy_rows, yy_diag, xy_rows = sums
    mmd2 = ((xx_rows.sum() - xx_diag.sum()) / (m * (m - 1))
            + (yy_rows.sum() - yy_diag.sum()) / (m * (m - 1))
            - 2. * xy_rows.sum() / (m * m))
    values.append(mmd2)
  values = np.asarray(values)
  return float(values.mean()), float(values.std())


def inception_score(logits, splits: int = 1) -> tuple[float, float]:
  """IS = exp(E_x KL(p(y|x) || p(y))) on each of ``splits`` parts: (mean, std) over them.

  Salimans et al. 2016 / tf-gan: p(y|x) = softmax(logits), p(y) the mean of p(y|x) over the
  part; parts are rows [i n / splits, (i + 1) n / splits). Computed in float64. One split
  (the default) is tf-gan's classifier_score_from_logits over all samples, the reference's
  protocol; its std is 0 by construction.

  Args:
    logits: [n, num_classes] unnormalized log-probabilities.
    splits: number of parts.

  Returns:
    (mean, std) of the per-part scores.
  """
  logits = np.asarray(logits, np.float64)
  n = len(logits)
  if splits < 1 or n < splits:
    raise ValueError(f'need at least splits={splits} >= 1 rows, got {n}')
  log_p = scipy.special.log_softmax(logits, axis=-1)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=-1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def write_weights_record(path: str, source_sha256: str, source_name: str) -> str:
  """Writes ``<path>.sha256`` (sha256sum format): the converted file's hash, then its source's.

  Returns the converted file's sha256. `load_inception_variables` checks both lines.
  """
  digest = file_sha256(path)
  with open(path + '.sha256', 'w') as f:
    f.write(f'{digest}  {os.path.basename(path)}\n{source_sha256}  {source_name}\n')
  return digest


def read_weights_record(path: str) -> tuple[str, str]:
  """(converted sha256, source sha256) of converted FID weights, both checked.

  The converted file must match its record, and the record must name pytorch-fid's file
  (PYTORCH_FID_WEIGHTS_SHA256) as the source: other weights give FID/KID/IS that cannot be
  compared with published numbers. (The record guards against wrong or stale files, not
  against a hand-forged one.)
  """
  record = path + '.sha256'
  if not os.path.isfile(record):
    raise FileNotFoundError(
        f'{record} is missing: scripts/convert_inception_weights.py writes it next to the weights')
  with open(record) as f:
    lines = [line.split() for line in f if line.strip()]
  if len(lines) != 2 or any(len(line) != 2 for line in lines):
    raise ValueError(f'{record}: expected two lines "<sha256>  <file>" (the converted weights, '
                     'then their source .pth); convert the weights again with '
                     'scripts/convert_inception_weights.py')
  (recorded, _), (source, source_name) = lines
  actual = file_sha256(path)
  if actual != recorded:
    raise ValueError(f'{path}: sha256 {actual} does not match {record} ({recorded}): the file '
                     'changed after conversion; convert the weights again')
  if source != PYTORCH_FID_WEIGHTS_SHA256:
    raise ValueError(f'{path} was converted from {source_name} (sha256 {source}), not from '
                     f"pytorch-fid's weights (sha256 {PYTORCH_FID_WEIGHTS_SHA256}): its FID/KID/IS "
                     f'would not be comparable with published numbers. Get '
                     f'{PYTORCH_FID_WEIGHTS_URL} and convert it with '
                     'scripts/convert_inception_weights.py')
  return actual, source


def checked_weights_path(weights_path: str | None = None) -> tuple[str, str, str]:
  """(path, converted sha256, source sha256) of converted FID Inception weights: the path
  given or $SCORE_SDE_INCEPTION_WEIGHTS, checked against its record (`read_weights_record`).

  Raises:
    FileNotFoundError: no path given, or the file or its .sha256 is missing (the message says
      where to get and how to convert the weights).
    ValueError: a checksum does not match, or the weights were not converted from pytorch-fid's.
  """
  path = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV)
  if not path:
    raise FileNotFoundError(_MISSING_WEIGHTS.format(
        where=f' (no weights_path and ${INCEPTION_WEIGHTS_ENV} is not set)'))
  if not os.path.isfile(path):
    raise FileNotFoundError(_MISSING_WEIGHTS.format(where=f' at {path!r}'))
  return (path,) + read_weights_record(path)


def load_inception_variables(weights_path: str | None = None) -> dict:
  """Loads converted FID Inception weights, checked first (`checked_weights_path`).

  Args:
    weights_path: the .msgpack written by scripts/convert_inception_weights.py; default
      $SCORE_SDE_INCEPTION_WEIGHTS.

  Returns:
    InceptionV3 variables {'params', 'batch_stats'}.
  """
  return _read_variables(checked_weights_path(weights_path)[0])


def _read_variables(path: str) -> dict:
  with open(path, 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


QUANTIZATION_RULES = ('round', 'floor')
SAMPLE_QUANTIZATION = 'floor'   # the reference's clip(x * 255, 0, 255).astype(uint8)


def quantize_images(images, rule: str = 'round') -> np.ndarray:
  """Images to uint8: uint8 as is; floats in [0, 1] as ``rule``(255 clip(x, 0, 1)).

  'round' is for real images stored as k / 255 (they come back to k exactly, even after
  centering to [-1, 1] and back, where float error can put 255 y just below k). 'floor' is
  the reference's rule for samples (`SAMPLE_QUANTIZATION`, see `quantize_samples`). NaN (a
  diverged sample) becomes 0, +-inf 255 and 0. Every feature extractor sees uint8 images,
  real and generated alike (the FID protocol of tf-gan and clean-fid).
  """
  if rule not in QUANTIZATION_RULES:
    raise ValueError(f'quantization rule={rule!r}; valid: {list(QUANTIZATION_RULES)}')
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  x = np.clip(np.nan_to_num(images.astype(np.float32), nan=0., posinf=1., neginf=0.), 0., 1.)
  return (np.floor if rule == 'floor' else np.round)(x * 255.).astype(np.uint8)


def quantize_samples(images) -> np.ndarray:
  """Generated images in [0, 1] to uint8 by the reference's rule, a floor of 255 x."""
  return quantize_images(images, SAMPLE_QUANTIZATION)


@functools.lru_cache(maxsize=None)
def _inception_apply(image_size: int, half_pixel_centers: bool):
  """The jitted network (resize included), shared by every evaluator with these settings."""
  model = InceptionV3(resize=False, half_pixel_centers=half_pixel_centers)

  def apply(variables, x):
    return model.apply(variables, resize_bilinear(x, image_size, half_pixel_centers))

  return jax.jit(apply)


class InceptionEvaluator:
  """FID Inception features and logits for batches of images, weights loaded once.

  Args:
    weights_path: see `load_inception_variables`.
    half_pixel_centers: the resize convention (True: pytorch-fid; False: TF1 / tf-gan).
    image_size: the network's input size; default INCEPTION_IMAGE_SIZE, 299, for every
      reported number (smaller sizes, >= 75, only make tests fast).
  """
  name = 'inception'
  feature_dim, num_classes = 2048, 1008

  def __init__(self, weights_path: str | None = None, half_pixel_centers: bool = True,
               image_size: int | None = None):
    path, self.weights_sha256, self.source_sha256 = checked_weights_path(weights_path)
    self.variables = _read_variables(path)   # the file just checked, hashed once
    image_size = image_size or INCEPTION_IMAGE_SIZE
    self.image_size = image_size
    self.half_pixel_centers = half_pixel_centers
    self._apply = _inception_apply(image_size, half_pixel_centers)

  def protocol(self) -> dict:
    """What a reported number was computed with: network, weights, input processing."""
    centers = ('half-pixel centers, as torch/pytorch-fid' if self.half_pixel_centers
               else 'corner-aligned, as TF1/tf-gan')
    return {'network': 'FID Inception-v3 (the 2015 TF graph of tf-gan, as ported by '
                       'pytorch-fid): pool_3 features (FID, KID), 1008 logits (IS)',
            'weights_sha256': self.weights_sha256,
            'converted_from_sha256': self.source_sha256,
            'resize': f'bilinear to {self.image_size}x{self.image_size}, no antialiasing, '
                      f'{centers}',
            'input_scaling': 'uint8 k -> k / 127.5 - 1'}

  def __call__(self, images, batch_size: int | None = None):
    """images [n, H, W, C] uint8 or floats in [0, 1] (C = 1 or 3), quantized to uint8
    first -> (pool_3 [n, 2048], logits [n, 1008]), numpy float32.

    The network runs on chunks of batch_size (default INCEPTION_BATCH_SIZE), the last one
    padded, so that one compiled shape serves every call.
    """
    batch_size = batch_size or INCEPTION_BATCH_SIZE
    x = quantize_images(images)
    if x.shape[-1] == 1:
      x = np.repeat(x, 3, axis=-1)
    features, logits = [], []
    for i in range(0, len(x), batch_size):
      chunk = x[i:i + batch_size]
      padded = np.zeros((batch_size,) + chunk.shape[1:], np.float32)
      padded[:len(chunk)] = chunk
      f, l = self._apply(self.variables, padded)
      features.append(np.asarray(f)[:len(chunk)])
      logits.append(np.asarray(l)[:len(chunk)])
    return np.concatenate(features), np.concatenate(logits)


# ----------------------------------------------------------------------------- digits


def load_digits(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """All digits of a split, in stored order: (images float32 [n, 8, 8, 1] in [0, 1], labels)."""
  import datasets   # only the digits helpers need the data pipeline
  data = datasets.get_dataset('digits', split=split, batch_size=4096, shuffle=False,
                              drop_remainder=False, num_epochs=1, data_dir=data_dir,
                              shard_index=0, shard_count=1)
  batches = list(data)
  return (np.concatenate([b['image'] for b in batches]),
          np.concatenate([b['label'] for b in batches]))


class DigitsEvaluator:
  """The committed digits classifier: features and logits for digits-FID/KID/IS.

  Args:
    path: the classifier's msgpack (default assets/digits_classifier.msgpack).
  """
  name = 'digits'
  feature_dim, num_classes = 64, 10

  def __init__(self, path: str = DIGITS_CLASSIFIER_PATH):
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'{path} not found: run `python scripts/train_digits_classifier.py` to create it')
    with open(path, 'rb') as f:
      self.params = flax.serialization.msgpack_restore(f.read())
    self.weights_sha256 = file_sha256(path)
    self._apply = jax.jit(DigitsClassifier().apply)

  def protocol(self) -> dict:
    """What a reported number was computed with (see InceptionEvaluator.protocol)."""
    return {'network': 'the embedded 8x8 digits classifier (assets/digits_classifier.msgpack): '
                       '64-d penultimate features (FID, KID), 10 logits (IS analogue)',
            'weights_sha256': self.weights_sha256, 'resize': 'none (8x8 input)',
            'input_scaling': 'uint8 k -> 2 k / 255 - 1'}

  def __call__(self, images, batch_size: int = 1000):
    """images [n, 8, 8, 1], uint8 or floats in [0, 1] (quantized to uint8 first, as real
    digits are stored) -> (features [n, 64], logits [n, 10]), numpy float32."""
    images = quantize_images(images).astype(np.float32) / 255.
    if images.shape[1:] != (8, 8, 1):
      raise ValueError(f'the digits classifier takes [n, 8, 8, 1] images, got {images.shape}')
    out = [self._apply({'params': self.params}, images[i:i + batch_size])
           for i in range(0, len(images), batch_size)]
    return (np.concatenate([np.asarray(f) for f, _ in out]),
            np.concatenate([np.asarray(l) for _, l in out]))


class FeatureReference(NamedTuple):
  """Statistics of real data in an evaluator's feature space, what FID and KID compare to.

  mu [d] and sigma [d, d] (float64, unbiased) over all num_examples images; features [m, d]:
  the rows KID draws its subsets from (all of them, or a seeded random subset of m).
  """
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray
  num_examples: int


DigitsReference = FeatureReference


def compute_reference(evaluator, image_batches: Iterable, max_kid_features: int = 10_000,
                      num_examples: int | None = None,
                      seed: int = 0) -> tuple[FeatureReference, np.ndarray]:
  """Streams batches of real images through an evaluator: (reference, logits [n, classes]).

  Args:
    evaluator: `DigitsEvaluator` or `InceptionEvaluator` (images are quantized to uint8).
    image_batches: batches [b, H, W, C], uint8 or floats in [0, 1]; every image is used
      (a short last batch included).
    max_kid_features: at most this many feature rows are kept for KID: all of them when the
      data has no more, else the rows of a seeded random subset of the indices (num_examples
      must then be given).
    num_examples: the number of images the batches hold (needed to draw the KID subset).
    seed: seeds the KID subset.
  """
  stats = FeatureStatistics()
  keep = None
  if num_examples is not None and num_examples > max_kid_features:
    keep = np.sort(np.random.default_rng(seed).choice(num_examples, max_kid_features,
                                                      replace=False))
  kept, logits, offset = [], [], 0
  for images in image_batches:
    f, l = evaluator(images)
    stats.update(f)
    logits.append(l)
    if keep is None:
      kept.append(f)
    else:
      rows = keep[(keep >= offset) & (keep < offset + len(f))] - offset
      kept.append(f[rows])
    offset += len(f)
  if num_examples is not None and offset != num_examples:
    raise ValueError(f'the batches held {offset} images, not num_examples={num_examples}')
  features = np.concatenate(kept).astype(np.float32)
  if keep is None and len(features) > max_kid_features:
    features = features[:max_kid_features]
  mu, sigma = stats.result()
  return FeatureReference(mu, sigma, features, stats.n), np.concatenate(logits)


def save_reference(path: str, reference: FeatureReference, **metadata):
  """Writes a reference as .npz (mu, sigma, kid_features, num_examples, metadata strings or
  numbers), atomically: the file exists whole or not at all."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, mu=reference.mu, sigma=reference.sigma, kid_features=reference.features,
             num_examples=reference.num_examples,
             **{f'meta_{k}': np.asarray(v) for k, v in metadata.items()})
  os.replace(tmp, path)


def load_reference(path: str) -> tuple[FeatureReference, dict]:
  """(reference, metadata) from a file written by `save_reference`."""
  with np.load(path) as data:
    reference = FeatureReference(data['mu'], data['sigma'], data['kid_features'],
                                 int(data['num_examples']))
    metadata = {k[len('meta_'):]: data[k].item() for k in data.files if k.startswith('meta_')}
  return reference, metadata


def digits_reference(evaluator: DigitsEvaluator, split: str = 'train',
                     data_dir: str | None = None) -> FeatureReference:
  """The reference statistics of a digits split (the train split for FID, as is usual)."""
  images = load_digits(split, data_dir)[0]
  return compute_reference(evaluator, [images], max_kid_features=len(images))[0]


SAMPLE_METRICS = ('fid', 'kid', 'inception_score')


def sample_metrics(features, logits, reference: FeatureReference, *,
                   metrics: Iterable[str] = SAMPLE_METRICS, kid_subsets: int = 100,
                   kid_subset_size: int = 1000, is_splits: int = 1,
                   seed: int = 0) -> dict[str, float]:
  """FID, KID and IS of generated images from their features [n, d] and logits [n, c].

  Args:
    features, logits: the evaluator's outputs on the (uint8-quantized) images.
    reference: the real data's `FeatureReference` (same evaluator).
    metrics: which of SAMPLE_METRICS to compute.
    kid_subsets, kid_subset_size, seed: see `kernel_inception_distance`.
    is_splits: see `inception_score`.

  Returns:
    Some of {'fid', 'kid', 'kid_std', 'inception_score', 'inception_score_std'} and
    'num_samples'; 'inception_score_std' only with is_splits > 1 (one split has no spread).
  """
  features = np.asarray(features)
  if features.shape[1:] != reference.mu.shape:
    raise ValueError(f'features {features.shape} do not fit the reference statistics '
                     f'{reference.mu.shape} (another evaluator?)')
  metrics = tuple(metrics)
  unknown = sorted(set(metrics) - set(SAMPLE_METRICS))
  if unknown:
    raise ValueError(f'unknown sample metrics {unknown}; valid: {list(SAMPLE_METRICS)}')
  out = {'num_samples': int(len(features))}
  if 'fid' in metrics:
    out['fid'] = frechet_distance(*feature_statistics(features), reference.mu, reference.sigma)
  if 'kid' in metrics:
    out['kid'], out['kid_std'] = kernel_inception_distance(
        features, reference.features, kid_subsets, kid_subset_size, seed)
  if 'inception_score' in metrics:
    out['inception_score'], is_std = inception_score(logits, is_splits)
    if is_splits > 1:
      out['inception_score_std'] = is_std
  return out


def digits_metrics(samples, evaluator: DigitsEvaluator, reference: FeatureReference, *,
                   kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 1,
                   seed: int = 0) -> dict[str, float]:
  """digits-FID, digits-KID and the digits Inception-Score analogue of samples.

  Args:
    samples: [n, 8, 8, 1] in [0, 1] (quantized to uint8 first, `quantize_samples`);
      n >= is_splits.
    evaluator: a `DigitsEvaluator`.
    reference: `digits_reference(evaluator)`.
    kid_subsets, kid_subset_size, seed: see `kernel_inception_distance`.
    is_splits: see `inception_score` (10 classes: the IS analogue lies in [1, 10]).

  Returns:
    {'fid', 'kid_mean', 'kid_std', 'is_mean', 'is_std'}.
  """
  features, logits = evaluator(quantize_samples(samples))
  m = sample_metrics(features, logits, reference, kid_subsets=kid_subsets,
                     kid_subset_size=kid_subset_size, is_splits=is_splits, seed=seed)
  return {'fid': m['fid'], 'kid_mean': m['kid'], 'kid_std': m['kid_std'],
          'is_mean': m['inception_score'], 'is_std': m.get('inception_score_std', 0.0)}


def fit_gaussian(images) -> tuple[np.ndarray, np.ndarray]:
  """The full-covariance Gaussian fit of images [n, ...]: (mean [D], covariance [D, D])."""
  return feature_statistics(np.asarray(images).reshape(len(images), -1))


def sample_gaussian(key, mean, cov, num_samples: int, shape=(8, 8, 1), clip: bool = True):
  """num_samples draws of N(mean, cov) as images [num_samples, *shape].

  The covariance may be singular (digits have always-black pixels): the draw uses its PSD
  square root. clip=True clips to the data range [0, 1], as samples are clipped before
  evaluation.
  """
  root = jnp.asarray(_symmetric_sqrt(np.asarray(cov, np.float64)), jnp.float32)
  z = jax.random.normal(key, (num_samples, root.shape[0]), jnp.float32)
  x = jnp.asarray(mean, jnp.float32)[None, :] + jnp.matmul(
      z, root.T, precision=jax.lax.Precision.HIGHEST)
  x = x.reshape((num_samples, *shape))
  return jnp.clip(x, 0., 1.) if clip else x


# ----------------------------------------------------------------------------- bits/dim baselines


def fit_diagonal_gaussian(x) -> tuple[np.ndarray, np.ndarray]:
  """The maximum-likelihood diagonal Gaussian of x [n, ...]: (mean [D], variance [D]) with
  ddof = 0, float64."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return x.mean(axis=0), x.var(axis=0)


def diagonal_gaussian_log_prob(x, mean, var) -> np.ndarray:
  """log N(x; mean, diag(var)) of each row of x [n, ...], in nats, float64."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return -0.5 * np.sum(np.log(2. * np.pi * var) + (x - mean) ** 2 / var, axis=-1)


def fit_density_baselines(x, gmm_components: int = 10, seed: int = 0) -> dict:
  """Density baselines fitted to training data x [n, ...] (already dequantized and scaled as
  the model sees it): {'diagonal_gaussian', 'gaussian_mixture'} -> log_prob(x [m, ...]) [m].

  The diagonal Gaussian is the maximum-likelihood fit; the mixture is scikit-learn's
  GaussianMixture (full covariances, k-means initialisation, seeded, reg_covar 1e-6), fitted
  in float64.
  """
  from sklearn.mixture import GaussianMixture   # only the baselines need scikit-learn
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  mean, var = fit_diagonal_gaussian(flat)
  gmm = GaussianMixture(gmm_components, covariance_type='full', reg_covar=1e-6,
                        random_state=seed, max_iter=200).fit(flat)
  return {
      'diagonal_gaussian': lambda y: diagonal_gaussian_log_prob(y, mean, var),
      'gaussian_mixture': lambda y: gmm.score_samples(
          np.asarray(y, np.float64).reshape(len(y), -1)),
  }


def bits_per_dim(log_prob, num_dims: int, num_bits: int | None = 8,
                 scaler_slope: float = 1.) -> np.ndarray:
  """bpd = -log p(x) / (D ln 2) + num_bits - log2(slope), as `likelihood.get_likelihood_fn`.

  log_prob is the density of the model's inputs x = slope y + shift, y = (k + u) / 2^b the
  uniformly dequantized data (see likelihood.py's docstring): the number is then an upper
  bound on the bits/dim of the discrete data, comparable across scalings.
  """
  offset = likelihood.bits_per_dim_offset(num_bits, scaler_slope)
  return -np.asarray(log_prob, np.float64) / (num_dims * np.log(2.)) + offset


# ---------------------------------------------------------------------------- image fidelity


def psnr(x, y, data_range: float = 1.0) -> np.ndarray:
  """Peak signal-to-noise ratio per image, 10 log10(range^2 / MSE), in dB: ``[n]``."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mse = np.mean((x - y).reshape(len(x), -1)**2, axis=1)
  return 10 * np.log10(data_range**2 / np.maximum(mse, 1e-20))


def ssim(x, y, data_range: float = 1.0, window: int = 7, sigma: float = 1.5) -> np.ndarray:
  """Structural similarity per image (Wang et al. 2004) with a Gaussian window (the window
  shrinks to the image for small images), averaged over positions and channels: ``[n]``.

  Local means, variances and covariance come from the window; K1 = 0.01, K2 = 0.03.
  """
  import scipy.ndimage
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  truncate = (min(window, x.shape[1], x.shape[2]) // 2) / sigma

  def blur(a):
    return scipy.ndimage.gaussian_filter(a, sigma=(0, sigma, sigma, 0), truncate=truncate,
                                         mode='reflect')
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  mx, my = blur(x), blur(y)
  vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
  return s.reshape(len(x), -1).mean(axis=1)
