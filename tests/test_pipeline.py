"""pipeline.py: batches made ahead in a thread or in Grain workers, the same as made in place."""
import functools
import threading

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


def test_thread_keeps_order_and_runs_ahead():
  made = []

  def make(i):
    made.append(i)
    return _square(i)

  it = pipeline.prefetch(make, range(20), buffer=3)
  first = next(it)
  np.testing.assert_array_equal(first['x'], [0, 0, 0])
  deadline = 100
  while len(made) < 5 and deadline:   # the thread fills its buffer while we wait
    threading.Event().wait(0.01)
    deadline -= 1
  assert made[:5] == [0, 1, 2, 3, 4]
  assert len(made) <= 1 + 3 + 1, 'runs further ahead than its buffer'
  rest = list(it)
  assert [int(b['x'][0]) for b in [first] + rest] == [i * i for i in range(20)]


def test_error_is_raised_at_its_item_and_close_stops_the_thread():
  it = pipeline.prefetch(_fail_at_five, range(10))
  assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
  with pytest.raises(KeyError, match='item five'):
    next(it)
  before = threading.active_count()
  it = pipeline.prefetch(_square, range(1000), buffer=2)
  next(it)
  it.close()
  assert threading.active_count() <= before


@pytest.mark.parametrize('kwargs, message', [
    (dict(workers=-1), 'workers must be an integer >= 0, got -1'),
    (dict(workers=1.5), 'workers must be an integer >= 0, got 1.5'),
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
                               workers=2, buffer=1))
  assert len(got) == len(calls)
  for (first, n), batch in zip(calls, got):
    want = train_lib.host_batches(dataset, first, n)
    assert batch['image'].shape == (n, 64, 8, 8, 1)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(batch[key], want[key])
