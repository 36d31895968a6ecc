"""The input pipeline: a run's batches, made in the training process or in worker processes.

A batch is a pure function of its step (`datasets.Dataset.batch`), so batches can be made by
any number of workers in any order and still be the same: the pipeline only decides where
and how early they are made, never what they hold. A resumed run asks for the items from its
step on and gets what an uninterrupted run would have seen.

``workers=0`` makes each item in the consuming thread when it is asked for. The training
loop asks for the next call's batches right after dispatching the current call, so they are
made (and copied to the devices) while the devices run it. That is the fastest choice when
batches come from memory (toy data, digits, anything within `datasets.get_dataset`'s memory
budget): a batch is then a few vectorized numpy calls, and a helper thread would only add
hand-offs through the GIL (measured by benchmarks/input_pipeline.py). ``workers > 0`` hands
the items to worker processes (``workers * buffer`` items in flight, returned in order), for
data decoded from storage on every read, where one Python thread cannot keep an accelerator
fed. The workers are a standard-library process pool: Grain's ``mp_prefetch`` was measured
beside it (benchmarks/input_pipeline.py --grain) and was slower per worker and scaled less.
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Any, Callable, Iterator, Sequence, TypeVar


T = TypeVar('T')
U = TypeVar('U')


def prefetch(make: Callable[[T], U], items: Sequence[T], *, workers: int = 0,
             buffer: int = 2, put: Callable[[U], Any] | None = None) -> Iterator[Any]:
  """``put(make(item))`` for each of ``items``, in order.

  Args:
    make: a function of one item; with ``workers > 0`` it must pickle (a module-level
      function or a functools.partial of one, over picklable arguments).
    items: what to make, in the order they are consumed.
    workers: 0 to make each item when it is asked for, in the consuming thread; otherwise
      the number of worker processes, which make items ahead.
    buffer: with ``workers > 0``, the items in flight per worker.
    put: applied in the consuming thread to each made item (the copy to the devices);
      None for the identity.

  An exception raised by ``make`` is raised again by the iterator, at its item. Closing the
  iterator (or dropping it) stops the workers.
  """
  if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
    raise ValueError(f'workers must be an integer >= 0, got {workers!r}')
  if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer < 1:
    raise ValueError(f'buffer must be an integer >= 1, got {buffer!r}')
  put = put or (lambda x: x)
  items = list(items)
  if workers == 0:
    return (put(make(item)) for item in items)
  return (put(x) for x in _process_prefetch(make, items, workers, buffer))


def _process_prefetch(make, items, workers, buffer):
  # Spawned, not forked: forking a process whose JAX runtime has started threads can deadlock.
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn'), initializer=_start_worker,
      initargs=(make, os.getpid()))
  pending = collections.deque()
  remaining = iter(items)

  def submit():
    for item in remaining:
      pending.append(pool.submit(_make_in_worker, item))
      return

  try:
    for _ in range(workers * buffer):
      submit()
    while pending:
      made = pending.popleft().result()
      submit()
      yield made
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


_WORKER_MAKE = None


def _start_worker(make, parent_pid):
  global _WORKER_MAKE
  _WORKER_MAKE = make
  _exit_with_parent(parent_pid)


def _make_in_worker(item):
  return _WORKER_MAKE(item)


def _exit_with_parent(parent_pid):
  """In each worker: die with the training process, even when it is SIGKILLed (Linux).

  Otherwise a killed run would leave its workers running, holding memory and the run's
  output pipes.
  """
  if sys.platform.startswith('linux'):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
  if os.getppid() != parent_pid:   # the parent died before prctl took effect
    os._exit(1)
