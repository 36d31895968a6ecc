"""datasets: local toy/digits/photos builds, image pipelines on TFDS mock data, the TFRecord reader."""
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

import datasets
from conftest import assert_matches_mixture


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _get(name, data_dir, **kwargs):
  kwargs = {'split': 'train', 'batch_size': 500, 'shard_index': 0, 'shard_count': 1, **kwargs}
  return datasets.get_dataset(name, data_dir=data_dir, **kwargs)


def _rows(x):
  return [row.tobytes() for row in np.asarray(x)]


def _concat(dataset, key):
  return np.concatenate([b[key] for b in dataset])


# ----------------------------------------------------------------------------- toy data


@pytest.mark.parametrize('name', sorted(datasets.TOY_DISTRIBUTIONS))
def test_toy_distribution_builds_with_fixed_splits(name, data_dir):
  train = _get(name, data_dir, batch_size=256)
  test = _get(name, data_dir, split='test', batch_size=256)
  assert (train.num_examples, test.num_examples) == (50_000, 10_000)
  assert train.data_shape == (2,) and train.steps_per_epoch == 50_000 // 256
  batch = train.batch(0)
  assert set(batch) == {'x'}
  assert batch['x'].shape == (256, 2) and batch['x'].dtype == np.float32
  assert np.all(np.isfinite(batch['x'])) and np.abs(batch['x']).max() < 10
  # The stored split does not depend on the order's seed; train and test are different draws.
  assert set(_rows(_get(name, data_dir, split='test', batch_size=10_000, seed=5).batch(0)['x'])) \
      == set(_rows(_get(name, data_dir, split='test', batch_size=10_000, seed=6).batch(0)['x']))
  assert not set(_rows(batch['x'])) & set(_rows(test.batch(0)['x']))


def test_toy_batches_are_a_function_of_seed_and_step(data_dir):
  a, b = (_get('two_moons', data_dir, seed=3) for _ in range(2))
  np.testing.assert_array_equal(a.batch(17)['x'], b.batch(17)['x'])
  assert not np.array_equal(a.batch(17)['x'], _get('two_moons', data_dir, seed=4).batch(17)['x'])
  # A new epoch is a new order.
  assert not np.array_equal(a.batch(0)['x'], a.batch(a.steps_per_epoch)['x'])


def test_toy_resume_matches_iteration_and_epochs_are_permutations(data_dir):
  kwargs = dict(split='test', batch_size=2_000, num_epochs=2, seed=1)
  batches = list(_get('swiss_roll', data_dir, **kwargs))
  resumed = _get('swiss_roll', data_dir, **kwargs)       # a fresh object, as after a kill
  assert len(batches) == resumed.num_steps == 10
  for step in (7, 0, 9, 4):
    np.testing.assert_array_equal(resumed.batch(step)['x'], batches[step]['x'])
  first = np.concatenate([b['x'] for b in batches[:5]])
  second = np.concatenate([b['x'] for b in batches[5:]])
  assert sorted(_rows(first)) == sorted(_rows(second)) and len(set(_rows(first))) == 10_000
  assert not np.array_equal(first, second)
  with pytest.raises(IndexError):
    resumed.batch(10)
  # The step may come straight from a train state.
  np.testing.assert_array_equal(resumed.batch(jnp.asarray(3))['x'], batches[3]['x'])
  np.testing.assert_array_equal(resumed.batch(np.int64(3))['x'], batches[3]['x'])


def test_toy_shards_of_two_hosts_are_disjoint_and_cover_the_split(data_dir):
  kwargs = dict(split='test', batch_size=500, num_epochs=1)
  everything = set(_rows(_concat(_get('rings', data_dir, shuffle=False, **kwargs), 'x')))
  shards = [_get('rings', data_dir, shard_index=i, shard_count=2, **kwargs) for i in range(2)]
  assert [s.shard_size for s in shards] == [5_000, 5_000]
  assert shards[0].steps_per_epoch == shards[1].steps_per_epoch == 10
  rows = [set(_rows(_concat(s, 'x'))) for s in shards]
  assert len(rows[0]) == len(rows[1]) == 5_000
  assert not rows[0] & rows[1]
  assert rows[0] | rows[1] == everything


def test_local_dataset_prepared_first_by_another_process_is_reused(tmp_path, monkeypatch):
  """Two hosts on one disk: the one whose rename loses the race reads the winner's copy."""
  data_dir = str(tmp_path)
  winner = datasets._Toy2D(config='two_moons', data_dir=data_dir, file_format='array_record')
  prepare = datasets._Toy2D.download_and_prepare

  def lose_the_race(self, *args, **kwargs):
    prepare(winner)
    raise FileExistsError('Cannot rename incomplete.XXXX_1.0.0: destination already exists.')

  monkeypatch.setattr(datasets._Toy2D, 'download_and_prepare', lose_the_race)
  ds = datasets.get_dataset('two_moons', split='test', batch_size=16, data_dir=data_dir,
                            shard_index=0, shard_count=1, shuffle=False)
  assert ds.num_examples == datasets.TOY_SPLITS['test']
  assert ds.batch(0)['x'].shape == (16, 2)


def test_embedded_dataset_is_generated_with_one_line_of_output(tmp_path, capfd):
  """No "Downloading and preparing dataset Unknown size", progress bars or escape codes: one
  line says what is generated where, once."""
  capfd.readouterr()
  for _ in range(2):
    datasets.get_dataset('rings', split='train', batch_size=8, data_dir=str(tmp_path),
                         shard_index=0, shard_count=1, shuffle=False)
  out, err = capfd.readouterr()
  assert out == '' and err == (
      f'Generating the embedded dataset score_sde_toy_2d/rings in {tmp_path}/score_sde_toy_2d/'
      'rings/1.0.0 (once; later runs read it).\n'), out + err


def test_mixture_log_prob_is_the_gaussian_mixture(mixture):
  log_prob = datasets.toy_log_prob('gaussian_mixture')
  x = np.random.default_rng(0).normal(size=(64, 2)) * 2
  np.testing.assert_allclose(log_prob(x), mixture.log_prob(jnp.asarray(x, jnp.float32)),
                             rtol=1e-6, atol=1e-6)
  side = np.linspace(-7, 7, 701)
  grid = np.stack(np.meshgrid(side, side), -1).reshape(-1, 2)
  mass = np.exp(np.asarray(log_prob(grid), np.float64)).sum() * (side[1] - side[0])**2
  np.testing.assert_allclose(mass, 1.0, atol=2e-3)


def test_mixture_samples_and_stored_data_follow_the_mixture(mixture, data_dir):
  x = datasets.TOY_DISTRIBUTIONS['gaussian_mixture'](np.random.default_rng(0), 50_000)
  assert_matches_mixture(mixture, x, weight_tol=0.01, mean_tol=0.02, cov_tol=0.02)
  stored = _get('gaussian_mixture', data_dir, split='test', batch_size=10_000).batch(0)['x']
  assert_matches_mixture(mixture, stored, weight_tol=0.02, mean_tol=0.04, cov_tol=0.04)


def test_checkerboard_log_prob_integrates_to_one_and_matches_samples():
  log_prob = datasets.toy_log_prob('checkerboard')
  side = (np.arange(800) + 0.5) / 100 - 4          # cell centres on [-4, 4]^2
  grid = np.stack(np.meshgrid(side, side), -1).reshape(-1, 2)
  mass = np.exp(np.asarray(log_prob(grid), np.float64)).sum() * 0.01**2
  np.testing.assert_allclose(mass, 1.0, atol=1e-6)
  x = datasets.TOY_DISTRIBUTIONS['checkerboard'](np.random.default_rng(0), 40_000)
  np.testing.assert_allclose(np.asarray(log_prob(x)), np.log(1 / 8))
  _, counts = np.unique(np.floor(x), axis=0, return_counts=True)
  assert len(counts) == 8
  np.testing.assert_allclose(counts / len(x), 1 / 8, atol=0.01)


def test_toy_sample_is_seeded():
  a = datasets.toy_sample('two_moons', 100, seed=1)
  assert a.shape == (100, 2) and a.dtype == np.float32
  np.testing.assert_array_equal(a, datasets.toy_sample('two_moons', 100, seed=1))
  assert not np.array_equal(a, datasets.toy_sample('two_moons', 100, seed=2))


def test_toy_log_prob_is_none_where_unknown():
  for name in ('two_moons', 'swiss_roll', 'rings', 'digits', 'cifar10', 'lsun/bedroom'):
    assert datasets.toy_log_prob(name) is None
  with pytest.raises(ValueError, match='checkerboard'):
    datasets.toy_log_prob('moons')


# ----------------------------------------------------------------------------- digits


def test_digits_fixed_split_labels_kept_and_range(data_dir):
  train = _get('digits', data_dir, batch_size=1_500, shuffle=False, num_epochs=1)
  test = _get('digits', data_dir, split='test', batch_size=297, shuffle=False, num_epochs=1)
  assert (train.num_examples, test.num_examples) == (1_500, 297)
  assert train.data_shape == (8, 8, 1)
  batches = [train.batch(0), test.batch(0)]
  for b in batches:
    assert b['image'].dtype == np.float32 and b['label'].dtype == np.int32
    assert b['image'].min() >= 0 and b['image'].max() <= 1
  # Pixels are round(v * 255 / 16): (image, label) pairs of the two splits partition sklearn's.
  digits = sklearn.datasets.load_digits()
  want = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
  pairs = [[(img.tobytes(), int(label)) for img, label in
            zip(np.round(b['image'] * 255).astype(np.uint8), b['label'])] for b in batches]
  assert not set(pairs[0]) & set(pairs[1])
  assert sorted(pairs[0] + pairs[1]) == sorted(
      (img.tobytes(), int(label)) for img, label in zip(want, digits.target))
  # Stratified: each class has 29 or 30 test examples.
  assert set(np.bincount(batches[1]['label'], minlength=10)) <= {29, 30}


def test_exact_evaluation_pass_keeps_the_last_partial_batch(data_dir):
  kwargs = dict(split='test', batch_size=100, shuffle=False, num_epochs=1)
  ds = _get('digits', data_dir, drop_remainder=False, **kwargs)
  sizes = [len(b['label']) for b in ds]
  assert sizes == [100, 100, 97] and ds.num_steps == 3
  whole = _get('digits', data_dir, split='test', batch_size=297, shuffle=False).batch(0)
  np.testing.assert_array_equal(_concat(ds, 'image'), whole['image'])
  assert [len(b['label']) for b in _get('digits', data_dir, **kwargs)] == [100, 100]


def test_digits_centered_range(data_dir):
  x = _get('digits', data_dir, batch_size=256, centered=True, random_flip=True,
           uniform_dequantization=True).batch(3)['image']
  assert x.min() >= -1 and x.max() < 1 and x.min() < -0.9 and x.max() > 0.9


def test_memory_and_storage_give_the_same_batches_and_memory_reads_each_example_once(data_dir):
  """Served from memory (decoded once) or read from storage every time, batches are
  bit-identical, across epochs and shards, augmentations included."""
  kwargs = dict(batch_size=128, random_flip=True, uniform_dequantization=True, centered=True,
                seed=7, shard_index=1, shard_count=2)
  memory = _get('digits', data_dir, **kwargs)
  storage = _get('digits', data_dir, memory_budget_mb=0, **kwargs)
  assert memory.in_memory and not storage.in_memory
  assert memory.decoded_bytes == 750 * (64 + 4)   # 750 examples per shard: 8x8 uint8 + label
  reads = []
  source_read = memory._read
  memory._read = lambda index: (reads.append(len(index)), source_read(index))[1]
  steps = list(range(2 * memory.steps_per_epoch + 1)) + [3, 0]
  for step in steps:
    a, b = memory.batch(step), storage.batch(step)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'step {step} {key}')
  # Each example is read the first time a batch needs it, and only then (the 110 examples
  # past an epoch's last full batch are read when a later epoch's order reaches them).
  assert sum(reads) == memory._decoded.sum() > 5 * 128
  del reads[:]
  for step in steps:
    memory.batch(step)
  assert not reads
  toy = _get('rings', data_dir, batch_size=500)
  toy_storage = _get('rings', data_dir, batch_size=500, memory_budget_mb=0)
  assert toy.in_memory and toy.decoded_bytes == 50_000 * 8
  for step in (0, 99, 100, 250):
    np.testing.assert_array_equal(toy.batch(step)['x'], toy_storage.batch(step)['x'])
  # A budget smaller than the data reads from storage.
  assert not _get('rings', data_dir, batch_size=500, memory_budget_mb=0.3).in_memory


# ----------------------------------------------------------------------------- photos


def test_photos_fixed_splits_shapes_and_the_stored_patches(data_dir, tmp_path):
  """'photos': 16x16 RGB patches of scikit-learn's sample photographs, fixed split sizes,
  stored exactly as datasets.photo_patches() cuts them (a pure function of the bundled
  photographs; TFDS stores each split in an order of its own), labels = which photograph."""
  assert 'photos' in datasets.valid_names() and datasets.is_known_dataset('photos')
  cut = datasets.photo_patches()
  for split, n in datasets.PHOTOS_SPLITS.items():
    ds = _get('photos', data_dir, split=split, batch_size=n, shuffle=False, num_epochs=1)
    assert ds.num_examples == n and ds.data_shape == (16, 16, 3)
    b = ds.batch(0)
    assert b['image'].dtype == np.float32 and b['label'].dtype == np.int32
    assert b['image'].min() >= 0 and b['image'].max() <= 1
    stored = np.round(b['image'] * 255).astype(np.uint8)   # k / 255 back to k
    images, labels = cut[split]
    assert images.shape == (n, 16, 16, 3) and images.dtype == np.uint8
    assert sorted(zip(_rows(stored), b['label'].tolist())) == sorted(
        zip(_rows(images), labels.tolist()))
    assert np.bincount(labels).tolist() == [n // 2, n // 2]   # as many from each photograph
  # Whole blocks are held out: no test patch is a training patch, and the splits differ.
  train, test = (set(_rows(cut[s][0])) for s in ('train', 'test'))
  assert not train & test
  assert abs(cut['train'][0].mean() - cut['test'][0].mean()) < 40   # both span the photographs
  # Cutting again gives the same patches, and a build elsewhere the same stored data.
  again = datasets.photo_patches()
  for split in cut:
    np.testing.assert_array_equal(again[split][0], cut[split][0])
  kwargs = dict(split='test', batch_size=486, shuffle=False)
  np.testing.assert_array_equal(_get('photos', str(tmp_path), **kwargs).batch(0)['image'],
                                _get('photos', data_dir, **kwargs).batch(0)['image'])


def test_photos_resize_to_8_and_center(data_dir):
  x = _get('photos', data_dir, batch_size=64, image_size=8, centered=True, random_flip=True,
           uniform_dequantization=True).batch(2)['image']
  assert x.shape == (64, 8, 8, 3) and x.dtype == np.float32
  assert x.min() >= -1 and x.max() < 1


# ----------------------------------------------------------------------------- images (mock)


@pytest.fixture
def mock_data():
  with tfds.testing.mock_data(num_examples=32):
    yield


@pytest.mark.parametrize('centered', [False, True])
def test_cifar10_shapes_labels_and_range(mock_data, tmp_path, centered):
  ds = _get('cifar10', str(tmp_path), batch_size=8, centered=centered)
  assert ds.num_examples == 32 and ds.data_shape == (32, 32, 3)
  batch = ds.batch(2)
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  x = batch['image']
  low = -1 if centered else 0
  assert x.min() >= low and x.max() <= 1 and x.min() < low + 0.1 and x.max() > 0.9
  plain = _get('cifar10', str(tmp_path), batch_size=8).batch(2)['image']
  np.testing.assert_allclose(datasets.inverse_scaler(centered)(x), plain, atol=1e-6)


def test_celeb_a_centre_crop_140_then_resize_64(mock_data, tmp_path):
  ds = _get('celeb_a', str(tmp_path), batch_size=4, shuffle=False)
  assert ds.data_shape == (64, 64, 3)
  batch = ds.batch(0)
  assert set(batch) == {'image'}
  raw = tfds.data_source('celeb_a', split='train', data_dir=str(tmp_path))[0]['image']
  assert raw.shape == (218, 178, 3)
  crop = raw[39:179, 19:159]                          # the central 140x140
  want = np.asarray(Image.fromarray(crop).resize((64, 64), Image.Resampling.BICUBIC)) / 255
  np.testing.assert_allclose(batch['image'][0], want, atol=1e-6)


def test_image_size_resizes_and_lsun_crops_to_square(mock_data, tmp_path):
  assert _get('cifar10', str(tmp_path), batch_size=4, image_size=16).batch(0)['image'].shape \
      == (4, 16, 16, 3)
  assert _get('mnist', str(tmp_path), batch_size=4, image_size=32).batch(0)['image'].shape \
      == (4, 32, 32, 1)
  assert _get('fashion_mnist', str(tmp_path), batch_size=4).data_shape == (28, 28, 1)
  assert _get('svhn_cropped', str(tmp_path), batch_size=4, split='extra').data_shape == (32, 32, 3)
  lsun = _get('lsun/church_outdoor', str(tmp_path), batch_size=4, image_size=24, split='validation')
  assert lsun.batch(1)['image'].shape == (4, 24, 24, 3)
  with pytest.raises(ValueError, match='lsun category'):
    _get('lsun/spaceship', str(tmp_path), batch_size=4)


def test_random_flip_flips_some_images_and_only_left_right(mock_data, tmp_path):
  kwargs = dict(batch_size=32, shuffle=False)
  plain = _get('cifar10', str(tmp_path), **kwargs).batch(0)['image']
  flipped = _get('cifar10', str(tmp_path), random_flip=True, **kwargs).batch(0)['image']
  same = [np.array_equal(a, b) for a, b in zip(plain, flipped)]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain, flipped)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 0 < sum(mirrored) < 32 and 0 < sum(same) < 32


def test_uniform_dequantization_stays_within_bins(mock_data, tmp_path):
  kwargs = dict(batch_size=32, shuffle=False)
  levels = np.round(_get('cifar10', str(tmp_path), **kwargs).batch(0)['image'] * 255)
  x = _get('cifar10', str(tmp_path), uniform_dequantization=True, **kwargs).batch(0)['image']
  assert x.min() >= 0 and x.max() < 1
  np.testing.assert_array_equal(np.floor(x * 256), levels)  # (v + u) / 256 in [v, v + 1) / 256
  u = x * 256 - levels
  assert 0.45 < u.mean() < 0.55 and u.std() > 0.25        # U[0, 1): mean 1/2, std 0.289
  centred = _get('cifar10', str(tmp_path), uniform_dequantization=True, centered=True,
                 **kwargs).batch(0)['image']
  np.testing.assert_allclose(centred, 2 * x - 1, atol=1e-6)


# ----------------------------------------------------------------------------- TFRecord


def _crc32c(data):
  """Bitwise reference crc32c (independent of datasets' table-driven one)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(crc):
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _write_tfrecord(path, images_chw):
  """The reference's layout: features 'shape' = [C, H, W] and 'data' = CHW uint8 bytes."""
  with open(path, 'wb') as f:
    for image in images_chw:
      example = tf_example_pb2.Example()
      example.features.feature['shape'].int64_list.value.extend(image.shape)
      example.features.feature['data'].bytes_list.value.append(image.tobytes())
      data = example.SerializeToString()
      length = struct.pack('<Q', len(data))
      f.write(length + struct.pack('<I', _masked(_crc32c(length))))
      f.write(data + struct.pack('<I', _masked(_crc32c(data))))


def test_crc32c_check_value():
  assert _crc32c(b'123456789') == 0xE3069283        # the standard CRC-32C check value


def test_ffhq_tfrecord_reader(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)
  _write_tfrecord(tmp_path / 'ffhq-a.tfrecords', images[:4])
  _write_tfrecord(tmp_path / 'ffhq-b.tfrecords', images[4:])
  kwargs = dict(batch_size=6, shuffle=False, tfrecords_path=str(tmp_path / 'ffhq-*.tfrecords'))
  ds = _get('ffhq', None, **kwargs)
  assert ds.num_examples == 6 and ds.data_shape == (16, 16, 3)
  batch = ds.batch(0)
  assert set(batch) == {'image'}
  np.testing.assert_allclose(batch['image'], images.transpose(0, 2, 3, 1) / 255, atol=1e-7)
  small = _get('celebahq', None, image_size=8, random_flip=True, uniform_dequantization=True,
               centered=True, **kwargs).batch(0)['image']
  assert small.shape == (6, 8, 8, 3) and small.min() >= -1 and small.max() < 1


def test_tfrecord_errors(tmp_path):
  path = tmp_path / 'bad.tfrecords'
  path.write_bytes(b'not a tfrecord file at all')
  with pytest.raises(ValueError, match='not a TFRecord'):
    _get('ffhq', None, tfrecords_path=str(path))
  with pytest.raises(ValueError, match='tfrecords_path'):
    _get('ffhq', None)
  with pytest.raises(FileNotFoundError, match='tfrecords_path'):
    _get('ffhq', None, tfrecords_path=str(tmp_path / 'missing-*.tfrecords'))
  with pytest.raises(ValueError, match='split'):
    _get('ffhq', None, split='test', tfrecords_path=str(path))


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match='unknown dataset') as info:
    datasets.get_dataset('cifar100', split='train', batch_size=8)
  for name in ('cifar10', 'celeb_a', 'lsun/<category>', 'ffhq', 'digits', 'gaussian_mixture'):
    assert name in str(info.value)


@pytest.mark.parametrize('kwargs, field', [
    (dict(batch_size=0), 'batch_size'),
    (dict(batch_size=-8), 'batch_size'),
    (dict(batch_size=2.0), 'batch_size'),
    (dict(batch_size=60_000), 'batch_size'),
    (dict(batch_size=30_000, shard_count=2), 'batch_size'),
    (dict(split='validation'), 'split'),
    (dict(shard_index=2, shard_count=2), 'shard_index'),
    (dict(seed=-1), 'seed'),
    (dict(num_epochs=0), 'num_epochs'),
    (dict(random_flip=True), 'random_flip'),
    (dict(image_size=32), 'image_size'),
    (dict(memory_budget_mb=-1), 'memory_budget_mb'),
    (dict(memory_budget_mb='1G'), 'memory_budget_mb'),
])
def test_bad_arguments_name_the_field(kwargs, field, data_dir):
  with pytest.raises(ValueError, match=field):
    _get('checkerboard', data_dir, **kwargs)


def test_missing_tfds_data_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='array_record'):
    _get('cifar10', str(tmp_path), batch_size=8)


def test_scalers_are_inverse():
  x = np.linspace(0, 1, 11)
  for centered in (False, True):
    np.testing.assert_allclose(datasets.inverse_scaler(centered)(datasets.scaler(centered)(x)), x)
  np.testing.assert_allclose(datasets.scaler(True)(x)[[0, -1]], [-1, 1])
  # Display range: the inverse scaler, clipped to [0, 1] (samples overshoot the data range).
  for centered in (False, True):
    overshoot = datasets.scaler(centered)(np.array([-0.2, 0.0, 0.3, 1.0, 1.4]))
    np.testing.assert_allclose(datasets.to_unit_range(overshoot, centered), [0, 0, 0.3, 1, 1],
                               atol=1e-7)
