"""pipeline.py: batches made in the training process or in Grain workers, the same either way."""
import functools

import numpy as np
import pytest

import datasets
import pipeline
import train_lib


def _square(i):
  return {'x': np.full((3,), i * i, np.int64)}


def _fail_at_five(i):
  if i == 5:
    raise KeyError('item five')
  return i


def test_in_process_items_are_made_when_asked_for_and_put():
  made = []

  def make(i):
    made.append(i)
    return _square(i)

  it = pipeline.prefetch(make, range(20), put=lambda b: b['x'][0])
  assert not made
  assert next(it) == 0 and made == [0]
  assert next(it) == 1 and made == [0, 1]
  assert list(it) == [i * i for i in range(2, 20)]


def test_error_is_raised_at_its_item():
  for workers in (0, 1):
    it = pipeline.prefetch(_fail_at_five, range(10), workers=workers)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError, match='item five'):
      next(it)


@pytest.mark.parametrize('kwargs, message', [
    (dict(workers=-1), 'workers must be an integer >= 0, got -1'),
    (dict(workers=1.5), 'workers must be an integer >= 0, got 1.5'),
    (dict(workers=True), 'workers must be an integer >= 0, got True'),
    (dict(buffer=0), 'buffer must be an integer >= 1, got 0')])
def test_bad_settings_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    pipeline.prefetch(_square, range(3), **kwargs)


def test_worker_processes_give_the_batches_made_in_place(data_dir):
  """Grain workers (read from storage each time: memory budget 0) make the same batches,
  in order, as train_lib.host_batches called directly, from any start step."""
  dataset = datasets.get_dataset('digits', split='train', batch_size=64, data_dir=data_dir,
                                 random_flip=True, uniform_dequantization=True,
                                 shard_index=0, shard_count=1, memory_budget_mb=0)
  calls = train_lib.call_schedule(17, 30, 4)   # a resumed run: steps 17..29, the last call short
  assert calls == [(17, 4), (21, 4), (25, 4), (29, 1)]
  got = list(pipeline.prefetch(functools.partial(train_lib._call_batches, dataset), calls,
                               workers=2, buffer=1, put=dict))
  assert len(got) == len(calls)
  for (first, n), batch in zip(calls, got):
    want = train_lib.host_batches(dataset, first, n)
    assert batch['image'].shape == (n, 64, 8, 8, 1)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(batch[key], want[key])
