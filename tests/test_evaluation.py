"""evaluation: FID/KID/IS against plain references and closed forms, the Inception network's
shapes and weight conversion (no torch, random weights), the digits evaluator and baselines."""
import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.special

import evaluation
from models import inception

# ----------------------------------------------------------------------------- helpers


def _random_gaussian(rng, d):
  a = rng.standard_normal((d, d))
  return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d)


def _sqrtm_fid(mu1, s1, mu2, s2):
  """pytorch-fid's formula: scipy.linalg.sqrtm of the product, real part."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2. * np.trace(covmean)


def _numpy_kid(x, y):
  """Binkowski et al.'s unbiased MMD^2, cubic kernel, all rows (one subset)."""
  d, m = x.shape[1], len(x)
  k = lambda a, b: (a @ b.T / d + 1.) ** 3
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
          - 2. * kxy.sum() / m ** 2)


def _numpy_is(logits, splits):
  p = scipy.special.softmax(np.asarray(logits, np.float64), axis=-1)
  scores, n = [], len(p)
  for i in range(splits):   # Salimans et al.'s parts: rows [i n / splits, (i + 1) n / splits)
    part = p[i * n // splits:(i + 1) * n // splits]
    py = part.mean(0, keepdims=True)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
  return np.mean(scores), np.std(scores)


# ----------------------------------------------------------------------------- FID


def test_frechet_distance_matches_sqrtm_reference_and_is_symmetric():
  rng = np.random.default_rng(0)
  g1, g2 = _random_gaussian(rng, 20), _random_gaussian(rng, 20)
  fid = evaluation.frechet_distance(*g1, *g2)
  np.testing.assert_allclose(fid, _sqrtm_fid(*g1, *g2), rtol=1e-8)
  np.testing.assert_allclose(evaluation.frechet_distance(*g2, *g1), fid, rtol=1e-10)
  assert abs(evaluation.frechet_distance(*g1, *g1)) < 1e-9


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
  s1, s2 = rng.uniform(0.1, 2., 8), rng.uniform(0.1, 2., 8)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2. * np.sqrt(s1 * s2))
  np.testing.assert_allclose(
      evaluation.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)), expected, rtol=1e-10)


def test_frechet_distance_of_rank_deficient_covariances_is_finite():
  rng = np.random.default_rng(2)
  mu1, s1 = evaluation.feature_statistics(rng.standard_normal((10, 32)))   # rank 9 < 32
  mu2, s2 = evaluation.feature_statistics(rng.standard_normal((10, 32)))
  fid = evaluation.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(fid) and fid > 0
  # sqrt of ~1e-15 round-off eigenvalues in the 22 null directions: ~1e-6 of tr(S) ~ 32.
  assert abs(evaluation.frechet_distance(mu1, s1, mu1, s1)) < 1e-5


def test_fid_of_samples_small_for_same_large_for_different_gaussians():
  rng = np.random.default_rng(3)
  mu, cov = _random_gaussian(rng, 10)
  chol = np.linalg.cholesky(cov)
  draw = lambda shift, n: mu + shift + rng.standard_normal((n, 10)) @ chol.T
  stats = lambda x: evaluation.feature_statistics(x)
  same = evaluation.frechet_distance(*stats(draw(0., 5000)), *stats(draw(0., 5000)))
  different = evaluation.frechet_distance(*stats(draw(0., 5000)), *stats(draw(1., 5000)))
  assert same < 0.05
  np.testing.assert_allclose(different, 10., rtol=0.05)   # ||shift||^2 = 10


def test_feature_statistics_streaming_matches_numpy():
  rng = np.random.default_rng(4)
  x = 100. + rng.standard_normal((1000, 6)) * rng.uniform(0.01, 1., 6)   # large mean
  mu, sigma = evaluation.feature_statistics(iter(np.array_split(x, 7)))
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64


# ----------------------------------------------------------------------------- KID, IS


def test_kid_matches_numpy_unbiased_estimator():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((200, 16))
  y = 0.3 + 1.2 * rng.standard_normal((300, 16))
  # subset_size >= 200 makes the first set whole; the second is subsampled, reproducibly.
  mean, std = evaluation.kernel_inception_distance(x, y, num_subsets=3, subset_size=200, seed=7)
  draws = np.random.default_rng(7)
  values = []
  for _ in range(3):
    xs = x[draws.choice(200, 200, replace=False)]
    ys = y[draws.choice(300, 200, replace=False)]
    values.append(_numpy_kid(xs, ys))
  np.testing.assert_allclose(mean, np.mean(values), rtol=1e-4)
  np.testing.assert_allclose(std, np.std(values), rtol=1e-2, atol=1e-6)
  same_mean, _ = evaluation.kernel_inception_distance(x[:100], x[100:], num_subsets=5,
                                                      subset_size=100)
  assert abs(same_mean) < 0.1 * mean


def test_inception_score_matches_numpy_and_limits():
  rng = np.random.default_rng(6)
  logits = 3. * rng.standard_normal((1003, 7))
  np.testing.assert_allclose(evaluation.inception_score(logits, splits=10),
                             _numpy_is(logits, 10), rtol=1e-10)
  one_hot = 50. * np.eye(10)[np.arange(1000) % 10]          # confident, uniform marginal
  np.testing.assert_allclose(evaluation.inception_score(one_hot, splits=10), (10., 0.), atol=1e-6)
  constant = np.tile(rng.standard_normal(10), (1000, 1))    # the same prediction everywhere
  np.testing.assert_allclose(evaluation.inception_score(constant, splits=10), (1., 0.), atol=1e-9)


def test_inception_score_defaults_to_one_split_over_all_samples():
  """The reference's protocol: tf-gan's classifier_score_from_logits over all samples,
  exp(E_x KL(p(y|x) || p(y))) with p(y) the mean over every sample. Ten splits (the old
  default) read systematically lower: each part's marginal is nearer its own samples."""
  rng = np.random.default_rng(7)
  logits = 2. * rng.standard_normal((2000, 10))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  marginal = p.mean(0)
  want = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
  score, std = evaluation.inception_score(logits)
  np.testing.assert_allclose(score, want, rtol=1e-10)
  assert std == 0.
  assert evaluation.inception_score(logits, splits=10)[0] < score
  # The report leaves out a spread that one split cannot have.
  reference = evaluation.FeatureReference(np.zeros(3), np.eye(3), np.zeros((4, 3)), 4)
  metrics = evaluation.sample_metrics(np.zeros((2000, 3)), logits, reference,
                                      metrics=('inception_score',))
  assert metrics['inception_score'] == pytest.approx(want, rel=1e-10)
  assert 'inception_score_std' not in metrics
  metrics = evaluation.sample_metrics(np.zeros((2000, 3)), logits, reference, is_splits=10,
                                      metrics=('inception_score',))
  assert metrics['inception_score_std'] > 0


def test_samples_quantize_by_the_reference_floor_and_real_images_round_back():
  rng = np.random.default_rng(8)
  x = np.concatenate([rng.uniform(-0.1, 1.1, 5000), [0.9990, 0.5 / 255, 254.7 / 255, 1.0, 0.0]])
  x = x.astype(np.float32)
  reference_rule = np.clip(x * 255, 0, 255).astype(np.uint8)   # score_sde's samples -> uint8
  np.testing.assert_array_equal(evaluation.quantize_samples(x), reference_rule)
  assert evaluation.quantize_samples(np.float32([254.7 / 255]))[0] == 254   # round gives 255
  assert evaluation.SAMPLE_QUANTIZATION == 'floor'
  # Real images stored as k / 255 come back to k, also after centering to [-1, 1] and back,
  # where a floor loses a level on some k.
  k = np.arange(256)
  centered = np.asarray(jnp.asarray(k, jnp.float32) / 255. * 2. - 1.)
  back = (centered + 1) / 2
  np.testing.assert_array_equal(evaluation.quantize_images(back), k)
  assert (np.floor(back * 255) != k).any()
  with pytest.raises(ValueError, match="rule='nearest'"):
    evaluation.quantize_images(x, 'nearest')


# ----------------------------------------------------------------------------- Inception


def test_resize_bilinear_matches_torch_and_tf1_conventions():
  ramp = jnp.asarray([0., 1.]).reshape(1, 1, 2, 1) * jnp.ones((1, 2, 1, 1))
  # torch F.interpolate(bilinear, align_corners=False) of [0, 1] to 4: [0, .25, .75, 1];
  # TF1 resize_bilinear(align_corners=False): [0, .5, 1, 1].
  torch_like = inception.resize_bilinear(ramp, 4, half_pixel_centers=True)
  tf1_like = inception.resize_bilinear(ramp, 4, half_pixel_centers=False)
  np.testing.assert_allclose(torch_like[0, 0, :, 0], [0., .25, .75, 1.], atol=1e-7)
  np.testing.assert_allclose(tf1_like[0, 0, :, 0], [0., .5, 1., 1.], atol=1e-7)


def test_resize_bilinear_to_299_matches_pointwise_reference():
  rng = np.random.default_rng(7)
  image = rng.uniform(0., 255., (1, 8, 6, 3))
  out = np.asarray(inception.resize_bilinear(image, 299))
  assert out.shape == (1, 299, 299, 3)

  def source(i, n_in):   # torch's area_pixel_compute_source_index + clamping
    s = max((i + 0.5) * n_in / 299 - 0.5, 0.)
    lo = min(int(np.floor(s)), n_in - 1)
    return lo, min(lo + 1, n_in - 1), s - lo

  for i, j in [(0, 0), (17, 200), (150, 3), (298, 298), (123, 45)]:
    y0, y1, wy = source(i, 8)
    x0, x1, wx = source(j, 6)
    img = image[0]
    expected = ((1 - wy) * ((1 - wx) * img[y0, x0] + wx * img[y0, x1])
                + wy * ((1 - wx) * img[y1, x0] + wx * img[y1, x1]))
    np.testing.assert_allclose(out[0, i, j], expected, rtol=1e-5)
  const = np.asarray(inception.resize_bilinear(np.full((1, 5, 5, 1), 7.), 299))
  np.testing.assert_allclose(const, 7., rtol=1e-6)


def _pytorch_fid_shapes():
  """pytorch-fid's FID Inception state dict: name -> shape (from torchvision's inception.py)."""
  convs = {}

  def add(block, rows):   # rows of (conv name, out channels, in channels, kh, kw)
    convs.update({f'{block}{name}': shape for name, *shape in rows})

  add('', [('Conv2d_1a_3x3', 32, 3, 3, 3), ('Conv2d_2a_3x3', 32, 32, 3, 3),
           ('Conv2d_2b_3x3', 64, 32, 3, 3), ('Conv2d_3b_1x1', 80, 64, 1, 1),
           ('Conv2d_4a_3x3', 192, 80, 3, 3)])
  for block, cin, pool in (('Mixed_5b', 192, 32), ('Mixed_5c', 256, 64), ('Mixed_5d', 288, 64)):
    add(f'{block}.', [('branch1x1', 64, cin, 1, 1), ('branch5x5_1', 48, cin, 1, 1),
                      ('branch5x5_2', 64, 48, 5, 5), ('branch3x3dbl_1', 64, cin, 1, 1),
                      ('branch3x3dbl_2', 96, 64, 3, 3), ('branch3x3dbl_3', 96, 96, 3, 3),
                      ('branch_pool', pool, cin, 1, 1)])
  add('Mixed_6a.', [('branch3x3', 384, 288, 3, 3), ('branch3x3dbl_1', 64, 288, 1, 1),
                    ('branch3x3dbl_2', 96, 64, 3, 3), ('branch3x3dbl_3', 96, 96, 3, 3)])
  for block, c in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
    add(f'{block}.', [('branch1x1', 192, 768, 1, 1), ('branch7x7_1', c, 768, 1, 1),
                      ('branch7x7_2', c, c, 1, 7), ('branch7x7_3', 192, c, 7, 1),
                      ('branch7x7dbl_1', c, 768, 1, 1), ('branch7x7dbl_2', c, c, 7, 1),
                      ('branch7x7dbl_3', c, c, 1, 7), ('branch7x7dbl_4', c, c, 7, 1),
                      ('branch7x7dbl_5', 192, c, 1, 7), ('branch_pool', 192, 768, 1, 1)])
  add('Mixed_7a.', [('branch3x3_1', 192, 768, 1, 1), ('branch3x3_2', 320, 192, 3, 3),
                    ('branch7x7x3_1', 192, 768, 1, 1), ('branch7x7x3_2', 192, 192, 1, 7),
                    ('branch7x7x3_3', 192, 192, 7, 1), ('branch7x7x3_4', 192, 192, 3, 3)])
  for block, cin in (('Mixed_7b', 1280), ('Mixed_7c', 2048)):
    add(f'{block}.', [('branch1x1', 320, cin, 1, 1), ('branch3x3_1', 384, cin, 1, 1),
                      ('branch3x3_2a', 384, 384, 1, 3), ('branch3x3_2b', 384, 384, 3, 1),
                      ('branch3x3dbl_1', 448, cin, 1, 1), ('branch3x3dbl_2', 384, 448, 3, 3),
                      ('branch3x3dbl_3a', 384, 384, 1, 3), ('branch3x3dbl_3b', 384, 384, 3, 1),
                      ('branch_pool', 192, cin, 1, 1)])
  shapes = {}
  for name, shape in convs.items():
    shapes[f'{name}.conv.weight'] = shape
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{name}.bn.{leaf}'] = shape[:1]
    shapes[f'{name}.bn.num_batches_tracked'] = ()
  shapes.update({'fc.weight': (1008, 2048), 'fc.bias': (1008,)})
  return shapes


@pytest.fixture(scope='module')
def random_state_dict():
  rng = np.random.default_rng(8)
  state = {}
  for name, shape in _pytorch_fid_shapes().items():
    if name.endswith('num_batches_tracked'):
      state[name] = np.array(0, np.int64)
    elif name.endswith('running_var'):
      state[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif name.endswith('.weight') and len(shape) == 4:   # He-scaled: activations stay O(1)
      fan_in = np.prod(shape[1:])
      state[name] = (rng.standard_normal(shape) * np.sqrt(2. / fan_in)).astype(np.float32)
    else:
      state[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return state


def test_weight_conversion_round_trip(random_state_dict):
  variables = inception.inception_variables_from_torch(random_state_dict)
  # Every tensor has the model's shape, and nothing is missing or extra.
  expected = jax.eval_shape(inception.InceptionV3(resize=False).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 75, 75, 3)))
  shapes = jax.tree.map(lambda a: a.shape, variables)
  assert shapes == jax.tree.map(lambda a: a.shape, dict(expected))
  # Layouts: conv OIHW -> HWIO, BatchNorm split into params and batch_stats, fc transposed.
  s = random_state_dict
  conv = variables['params']['Mixed_6b']['branch7x7_2']
  np.testing.assert_array_equal(conv['conv']['kernel'][0, 4, 5, 6],
                                s['Mixed_6b.branch7x7_2.conv.weight'][6, 5, 0, 4])
  np.testing.assert_array_equal(conv['bn']['scale'], s['Mixed_6b.branch7x7_2.bn.weight'])
  np.testing.assert_array_equal(conv['bn']['bias'], s['Mixed_6b.branch7x7_2.bn.bias'])
  stats = variables['batch_stats']['Mixed_6b']['branch7x7_2']['bn']
  np.testing.assert_array_equal(stats['mean'], s['Mixed_6b.branch7x7_2.bn.running_mean'])
  np.testing.assert_array_equal(stats['var'], s['Mixed_6b.branch7x7_2.bn.running_var'])
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], s['fc.weight'].T)
  # And back, through the serialized file format.
  import flax.serialization
  restored = flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(variables))
  back = inception.inception_state_dict(restored)
  kept = {k: v for k, v in s.items() if not k.endswith('num_batches_tracked')}
  assert set(back) == set(kept)
  for k, v in kept.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_converter_script_round_trip(random_state_dict):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'convert_inception_weights.py')
  spec = importlib.util.spec_from_file_location('convert_inception_weights', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data = module.convert(random_state_dict)
  import flax.serialization
  params = flax.serialization.msgpack_restore(data)['params']
  torch_kernel = random_state_dict['Conv2d_1a_3x3.conv.weight']
  np.testing.assert_array_equal(params['Conv2d_1a_3x3']['conv']['kernel'],
                                torch_kernel.transpose(2, 3, 1, 0))


def test_inception_output_shapes_at_small_input(random_state_dict):
  variables = inception.inception_variables_from_torch(random_state_dict)
  images = np.random.default_rng(9).uniform(0., 255., (2, 75, 75, 3)).astype(np.float32)
  pool3, logits = jax.jit(inception.InceptionV3(resize=False).apply)(variables, images)
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.all(np.isfinite(pool3)) and np.all(np.isfinite(logits))
  assert np.all(np.asarray(pool3) >= 0.)   # a mean of ReLU outputs


def test_fid_blocks_pool_without_padding():
  x = jnp.arange(9.).reshape(1, 3, 3, 1)
  pooled = inception.avg_pool_3x3(x)
  np.testing.assert_allclose(pooled[0, 0, 0, 0], (0. + 1. + 3. + 4.) / 4.)   # not / 9


def test_missing_inception_weights_raise_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.delenv(evaluation.INCEPTION_WEIGHTS_ENV, raising=False)
  with pytest.raises(FileNotFoundError, match='convert_inception_weights.py') as e:
    evaluation.load_inception_variables()
  assert 'pt_inception-2015-12-05-6726825d.pth' in str(e.value)
  with pytest.raises(FileNotFoundError, match='not found at'):
    evaluation.InceptionEvaluator(str(tmp_path / 'missing.msgpack'))


def test_inception_weights_checksum_and_source_are_verified(tmp_path, monkeypatch):
  path = tmp_path / 'w.msgpack'
  path.write_bytes(b'not the weights')
  with pytest.raises(FileNotFoundError, match='sha256'):
    evaluation.load_inception_variables(str(path))
  record = tmp_path / 'w.msgpack.sha256'
  record.write_text(evaluation.file_sha256(path) + '  w.msgpack\n')   # no source line
  with pytest.raises(ValueError, match='expected two lines'):
    evaluation.load_inception_variables(str(path))
  pth = 'pt_inception-2015-12-05-6726825d.pth'
  record.write_text('0' * 64 + f'  w.msgpack\n{evaluation.PYTORCH_FID_WEIGHTS_SHA256}  {pth}\n')
  monkeypatch.setenv(evaluation.INCEPTION_WEIGHTS_ENV, str(path))
  with pytest.raises(ValueError, match='does not match'):
    evaluation.load_inception_variables()
  # Converted from another .pth (a matching record beside it is not enough).
  other = hashlib.sha256(b'another network').hexdigest()
  evaluation.write_weights_record(str(path), other, 'other.pth')
  with pytest.raises(ValueError, match=f"converted from other.pth .sha256 {other}., not from "
                                       "pytorch-fid's weights"):
    evaluation.load_inception_variables()
  evaluation.write_weights_record(str(path), evaluation.PYTORCH_FID_WEIGHTS_SHA256, pth)
  assert evaluation.read_weights_record(str(path)) == (
      evaluation.file_sha256(path), evaluation.PYTORCH_FID_WEIGHTS_SHA256)


def test_pinned_pytorch_fid_hash_is_the_one_its_file_name_carries():
  # torch.hub names a file by the first 8 hex digits of its sha256.
  name = evaluation.PYTORCH_FID_WEIGHTS_URL.rsplit('/', 1)[1]
  assert name == 'pt_inception-2015-12-05-6726825d.pth'
  assert len(evaluation.PYTORCH_FID_WEIGHTS_SHA256) == 64
  assert evaluation.PYTORCH_FID_WEIGHTS_SHA256.startswith(name[-12:-4])


def test_converter_refuses_a_file_that_is_not_pytorch_fids(tmp_path):
  source = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  source.write_bytes(b'a download cut short')
  script = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'convert_inception_weights.py')
  result = subprocess.run([sys.executable, script, str(source), str(tmp_path / 'out.msgpack')],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr
  assert f'sha256 {evaluation.file_sha256(source)} (20 bytes) is not pytorch-fid' in result.stderr
  assert evaluation.PYTORCH_FID_WEIGHTS_SHA256 in result.stderr
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'out.msgpack').exists()


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope='module')
def digits():
  evaluator = evaluation.DigitsEvaluator()
  train_x, _ = evaluation.load_digits('train')
  test_x, test_y = evaluation.load_digits('test')
  reference = evaluation.digits_reference(evaluator)
  return evaluator, reference, train_x, test_x, test_y


def test_digits_classifier_is_small_and_accurate(digits):
  evaluator, _, _, test_x, test_y = digits
  assert os.path.getsize(evaluation.DIGITS_CLASSIFIER_PATH) < 100_000
  features, logits = evaluator(test_x)
  assert features.shape == (297, 64) and logits.shape == (297, 10)
  assert np.mean(np.argmax(logits, -1) == test_y) >= 0.95


def test_real_digits_score_far_better_than_gaussian_baseline(digits):
  evaluator, reference, train_x, test_x, _ = digits
  real = evaluation.digits_metrics(test_x, evaluator, reference)
  mean, cov = evaluation.fit_gaussian(train_x)
  fake = evaluation.sample_gaussian(jax.random.PRNGKey(0), mean, cov, 1500)
  gaussian = evaluation.digits_metrics(fake, evaluator, reference)
  assert real['fid'] * 5. < gaussian['fid']
  assert real['kid_mean'] * 5. < gaussian['kid_mean']
  assert real['is_mean'] > gaussian['is_mean']
  assert real['is_mean'] > 8.   # 10 balanced classes, classified confidently


# ----------------------------------------------------------------------------- bits/dim baselines


def test_diagonal_gaussian_bpd_equals_closed_form():
  """On its own training data, the ML diagonal Gaussian has -log p / D = mean_d 0.5 log(2 pi e
  var_d): with 8-bit dequantization and centered data (slope 2), bpd = that in bits + 8 - 1."""
  rng = np.random.default_rng(3)
  k = rng.integers(0, 256, (400, 4, 4, 1)) // 17 * 17     # 16 grey levels, as digits have 17
  y = (k + rng.uniform(size=k.shape)) / 256.              # uniform dequantization into [0, 1)
  x = 2. * y - 1.                                         # centered: the model's inputs
  baselines = evaluation.fit_density_baselines(x, gmm_components=2)
  bpd = evaluation.bits_per_dim(baselines['diagonal_gaussian'](x), 16, 8, 2.).mean()
  var_y = y.reshape(400, 16).var(axis=0)
  closed_form = np.mean(0.5 * np.log2(2. * np.pi * np.e * var_y)) + 8.
  np.testing.assert_allclose(bpd, closed_form, rtol=1e-10)
  # Scaling does not change bits/dim: the offset log2(slope) absorbs it.
  uncentered = evaluation.fit_density_baselines(y, gmm_components=2)
  np.testing.assert_allclose(
      evaluation.bits_per_dim(uncentered['diagonal_gaussian'](y), 16, 8, 1.).mean(), bpd,
      rtol=1e-10)
  # The mixture (full covariances) fits its training data better than the diagonal Gaussian.
  gmm = evaluation.bits_per_dim(baselines['gaussian_mixture'](x), 16, 8, 2.).mean()
  assert np.isfinite(gmm) and gmm < bpd


# ----------------------------------------------------------------------------- dataset statistics


@pytest.mark.slow
def test_stats_mode_on_mock_cifar10_with_random_inception_weights(random_state_dict, tmp_path,
                                                                  monkeypatch):
  """--mode stats end to end: no dropped last batch, uint8 inputs, a clear error for each
  missing file. Random weights and 75 px inputs: plumbing only, no number here means anything."""
  import flax.serialization
  import tensorflow_datasets as tfds
  import eval_lib
  import run_lib
  from configs.ve import cifar10_ncsnpp_continuous as cifar10
  monkeypatch.setattr(evaluation, 'INCEPTION_IMAGE_SIZE', 75)
  monkeypatch.setattr(evaluation, 'INCEPTION_BATCH_SIZE', 12)   # one compiled shape
  monkeypatch.delenv(evaluation.INCEPTION_WEIGHTS_ENV, raising=False)
  config = cifar10.get_config()
  config.data.data_dir = str(tmp_path / 'data')
  config.eval.batch_size = 12                  # 32 mock images: batches of 12, 12 and 8
  workdir = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=32):
    with pytest.raises(ValueError, match='stats_num_examples=50000 but the .train. split of '
                                         'cifar10 has 32 images'):
      run_lib.run(config, workdir, 'stats')
    config.eval.stats_num_examples = 0
    with pytest.raises(FileNotFoundError, match='convert_inception_weights.py'):
      run_lib.run(config, workdir, 'stats')
    weights = tmp_path / 'inception.msgpack'
    weights.write_bytes(flax.serialization.msgpack_serialize(
        inception.inception_variables_from_torch(random_state_dict)))
    # A stand-in for the converted weights: random values, recorded as converted from
    # pytorch-fid's file so that the loader accepts them.
    evaluation.write_weights_record(str(weights), evaluation.PYTORCH_FID_WEIGHTS_SHA256,
                                    'pt_inception-2015-12-05-6726825d.pth')
    config.eval.inception_weights = str(weights)
    with pytest.raises(FileNotFoundError, match='--mode stats'):
      eval_lib.load_stats(config, workdir, evaluation.InceptionEvaluator(str(weights)), (32, 32, 3))
    [path] = run_lib.run(config, workdir, 'stats')
    raw = np.stack([e['image'] for e in tfds.data_source('cifar10', split='train',
                                                         data_dir=config.data.data_dir)])
  reference, meta = evaluation.load_reference(path)
  assert path.endswith('cifar10_train_all_32px_inception.npz')
  assert meta['features'] == 'inception' and meta['image_size'] == 32 and meta['split'] == 'train'
  assert reference.num_examples == 32 and reference.features.shape == (32, 2048)
  assert reference.mu.shape == (2048,) and reference.sigma.shape == (2048, 2048)
  # The features are those of the stored uint8 images, every one of them.
  evaluator = evaluation.InceptionEvaluator(str(weights))
  features, logits = evaluator(raw)
  np.testing.assert_allclose(reference.features, features, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(reference.mu, features.mean(0), rtol=1e-4, atol=1e-5)
  # Samples are compared with the saved statistics: identical images give KID ~ 0.
  loaded = eval_lib.load_stats(config, workdir, evaluator, (32, 32, 3))
  metrics = evaluation.sample_metrics(features, logits, loaded, is_splits=2,
                                     metrics=('kid', 'inception_score'))   # FID: a 2048^2 eigh
  assert set(metrics) == {'num_samples', 'kid', 'kid_std', 'inception_score',
                          'inception_score_std'} and abs(metrics['kid']) < 1e-3
  with pytest.raises(ValueError, match='image_size=32'):
    eval_lib.load_stats(config, workdir, evaluator, (64, 64, 3))
