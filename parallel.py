"""Parallelism at the edge: the device mesh and work shared among processes.

One ``jax.sharding.Mesh`` over all devices of all processes, the batch split along its
'data' axis; evaluation and sampling split their batches and rounds among processes and
gather the results. The core modules stay single-device and pure.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

import progress


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all processes); the batch is split along 'data'."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices, ('data',))


def host_local(tree):
  """This process's own copy of a pytree of replicated arrays, as single-device arrays.

  A replicated global array spans every process's devices; a computation that only
  one process runs (snapshot samples) or that each process runs on its own share
  (evaluation) needs the copy on one of its own devices.
  """
  return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def map_over_processes(fn, n, item_shape=(), desc=None):
  """``[fn(0), ..., fn(n - 1)]``, process p computing the items i with i mod count = p.

  ``fn(i)`` returns an array of shape ``[length_i, *item_shape]`` (the length may vary
  with i). Every process gets all n results, in index order, as float32. With one
  process this is a plain loop. ``desc``: show a progress bar of process 0's items.
  """
  count, me = jax.process_count(), jax.process_index()
  item_shape = tuple(item_shape)
  mine = []
  items = range(me, n, count)
  with progress.bar(len(items), desc, primary=desc is not None and me == 0) as bar:
    for i in items:
      mine.append(np.asarray(fn(i), np.float32).reshape((-1,) + item_shape))
      bar.update()
  if count == 1:
    return mine
  from jax.experimental import multihost_utils
  lengths = np.zeros(-(-n // count), np.int32)   # at most ceil(n / count) items each
  lengths[:len(mine)] = [len(m) for m in mine]
  all_lengths = np.asarray(multihost_utils.process_allgather(lengths))   # [count, items]
  data = np.zeros((int(all_lengths.sum(axis=1).max()),) + item_shape, np.float32)
  if mine:
    flat = np.concatenate(mine)
    data[:len(flat)] = flat
  all_data = np.asarray(multihost_utils.process_allgather(data))          # [count, rows, ...]
  out = [None] * n
  for p in range(count):
    offsets = np.concatenate([[0], np.cumsum(all_lengths[p])])
    for j, i in enumerate(range(p, n, count)):
      out[i] = all_data[p, offsets[j]:offsets[j + 1]]
  return out


def check_processes_agree(value: float, what: str):
  """Raises when processes hold different values of something that must be replicated.

  ``value`` summarizes this process's copy (e.g. a parameter checksum); with one process
  there is nothing to compare.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  values = np.asarray(multihost_utils.process_allgather(np.float64(value)), np.float64).ravel()
  if not np.all(values == values[0]):
    raise RuntimeError(f'processes disagree on {what}: ' + ', '.join(
        f'process {p}: {v:.10e}' for p, v in enumerate(values)))


def all_agree(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (each process passes its own)."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils
  return bool(np.all(np.asarray(multihost_utils.process_allgather(np.int32(bool(ok))))))
