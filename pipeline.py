"""The input pipeline: batches prepared ahead of the device, in a thread or in worker processes.

A batch is a pure function of its step (`datasets.Dataset.batch`), so batches can be made by
any number of workers in any order and still be the same: the pipeline only decides where
and how early they are made, never what they hold. A resumed run asks for the items from its
step on and gets what an uninterrupted run would have seen.

``workers=0`` makes the items in one background thread, at most ``buffer`` ahead. That is
enough when batches come from memory (toy data, digits, anything within the memory budget
of `datasets.get_dataset`): gathering and augmenting a batch is a few vectorized numpy calls,
and the training step itself runs outside the GIL. ``workers > 0`` hands the items to Grain's
worker processes (``mp_prefetch``: worker i makes items i, i + W, ..., returned in order),
for data decoded from storage on every read, where one Python thread is the bottleneck.
"""
from __future__ import annotations

import ctypes
import functools
import os
import queue
import signal
import sys
import threading
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar('T')
U = TypeVar('U')

_DONE = object()


def prefetch(make: Callable[[T], U], items: Sequence[T], *, workers: int = 0,
             buffer: int = 2) -> Iterator[U]:
  """``make(item)`` for each of ``items``, in order, prepared ahead of the consumer.

  Args:
    make: a function of one item; with ``workers > 0`` it must pickle (a module-level
      function or a functools.partial of one, over picklable arguments).
    items: what to make, in the order they are consumed.
    workers: 0 for one background thread; otherwise the number of worker processes.
    buffer: items made ahead of the consumer (per worker with ``workers > 0``).

  An exception raised by ``make`` is raised again by the iterator, at its item. Closing the
  iterator (or dropping it) stops the thread or the workers.
  """
  if not isinstance(workers, int) or workers < 0:
    raise ValueError(f'workers must be an integer >= 0, got {workers!r}')
  if not isinstance(buffer, int) or buffer < 1:
    raise ValueError(f'buffer must be an integer >= 1, got {buffer!r}')
  items = list(items)
  if workers == 0:
    return _thread_prefetch(make, items, buffer)
  return _grain_prefetch(make, items, workers, buffer)


def _thread_prefetch(make, items, buffer):
  out = queue.Queue(maxsize=buffer)
  stop = threading.Event()

  def produce():
    for item in items:
      try:
        value = make(item)
      except BaseException as e:   # handed to the consumer, raised there
        value = _Failure(e)
      while not stop.is_set():
        try:
          out.put(value, timeout=0.1)
          break
        except queue.Full:
          continue
      if stop.is_set() or isinstance(value, _Failure):
        return
    out.put(_DONE)

  thread = threading.Thread(target=produce, name='input-pipeline', daemon=True)
  thread.start()
  try:
    while True:
      value = out.get()
      if value is _DONE:
        return
      if isinstance(value, _Failure):
        raise value.error
      yield value
  finally:
    stop.set()
    thread.join()


class _Failure:
  def __init__(self, error):
    self.error = error


def _grain_prefetch(make, items, workers, buffer):
  import grain   # only for worker processes
  from absl import flags
  if not flags.FLAGS.is_parsed():
    # Grain reads its absl flags' defaults; outside an absl app (tests, notebooks) nothing
    # has parsed them yet.
    flags.FLAGS.mark_as_parsed()
  dataset = grain.MapDataset.source(items).map(make).to_iter_dataset()
  iterator = iter(dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer),
      worker_init_fn=functools.partial(_exit_with_parent, os.getpid())))
  try:
    for item in iterator:
      # Copied out of the workers' shared memory, which is then free for the next item.
      yield _copy(item)
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()


def _exit_with_parent(parent_pid, worker_index, worker_count):
  """In each worker: die with the training process, even when it is SIGKILLed (Linux).

  Grain's workers do not watch their parent: a killed run would leave them running, holding
  memory and the run's output pipes.
  """
  del worker_index, worker_count
  if sys.platform.startswith('linux'):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
  if os.getppid() != parent_pid:   # the parent died before prctl took effect
    os._exit(1)


def _copy(tree):
  if isinstance(tree, dict):
    return {k: _copy(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_copy(v) for v in tree)
  return np.array(tree)
