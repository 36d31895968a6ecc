#!/usr/bin/env python
"""The input pipeline alone, against worker count, and the training loop's overhead over its step.

Part 1, examples/s of the pipeline alone (`pipeline.prefetch` over `train_lib.host_batches`,
one batch per call, consumed as fast as it comes, the first batches excluded so that worker
start-up is not counted): toy data and digits served from memory (the default) and read from
storage on every batch (memory budget 0), mock CIFAR-10 at 32 px and mock LSUN at 256 px
(`tfds.testing.mock_data`: random images made per read, then the real crop, resize and
augmentation), each with workers = 0 (made in the consuming process), 1, 2, ... worker
processes; with --grain, Grain's mp_prefetch does the same work beside the project's process
pool. The baseline of each dataset is workers = 0 in the same run. From the best CIFAR-10
rate per worker process it estimates the cores a host needs to feed one H100 training NCSN++
at 5,000 images/s (mock images cost less to make than decoding real PNGs: a lower bound).

Part 2, the training loop's overhead: the compiled train step alone (calls dispatched back to
back on one device-resident batch, waited for at the end) against `train_lib.train` on the
same config (seconds per step from its first log line after the first epoch to its last,
from metrics.jsonl: compilation, start-up, the final checkpoint and the first epoch, whose
batches also decode each example into memory, are outside that window; the first epoch's
own rate is reported beside it). Overhead = loop / step - 1; the issue's target is <= 5% for
toy and digits.

Usage (repository root):  python benchmarks/input_pipeline.py [--quick]
Writes benchmarks/results/input_pipeline.json and prints the tables.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import builder  # noqa: E402
import common  # noqa: E402  (benchmarks/common.py)
import datasets  # noqa: E402
import parallel  # noqa: E402
import pipeline  # noqa: E402
import train_lib  # noqa: E402
from configs.toy import mixture  # noqa: E402
from configs.vp import digits  # noqa: E402

H100_IMAGES_PER_S = 5000   # NCSN++ at batch 128 on one H100 (the figure)


def grain_prefetch(make, items, workers, buffer):
  """The same work through Grain's worker processes (mp_prefetch), for comparison."""
  import grain
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()   # Grain reads absl flags
  dataset = grain.MapDataset.source(items).map(make).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer))
  for item in dataset.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=buffer)):
    yield {k: np.array(v) for k, v in item.items()}   # out of the shared memory, as we use it


def pipeline_rate(dataset, workers, calls, skip, backend='pipeline'):
  """Examples/s of the pipeline over ``calls`` batches, timed after the first ``skip``."""
  items = [(s, 1) for s in range(calls)]
  make = functools.partial(train_lib._call_batches, dataset)
  if backend == 'grain':
    it = grain_prefetch(make, items, workers, buffer=2)
  else:
    it = pipeline.prefetch(make, items, workers=workers, buffer=2)
  for _ in range(skip):
    next(it)
  t0 = time.perf_counter()
  n = sum(1 for _ in it)
  return n * dataset.batch_size / (time.perf_counter() - t0)


def pipeline_rows(data_dir, worker_counts, quick, grain):
  scale = 0.25 if quick else 1.0
  cases = [  # (label, dataset name, kwargs, batch, calls, workers tried)
      ('toy (memory)', 'gaussian_mixture', {}, 256, 2000, [0]),
      ('toy (storage)', 'gaussian_mixture', dict(memory_budget_mb=0), 256, 200, worker_counts),
      ('digits (memory)', 'digits', {}, 128, 2000, [0]),
      ('digits (storage)', 'digits', dict(memory_budget_mb=0), 128, 200, worker_counts),
      ('cifar10 32px (mock, storage)', 'cifar10', dict(memory_budget_mb=0), 128, 120, worker_counts),
      ('lsun 256px (mock, storage)', 'lsun/bedroom', dict(memory_budget_mb=0), 32, 60, worker_counts),
  ]
  rows = []
  for label, name, kwargs, batch, calls, workers_list in cases:
    calls = max(20, int(calls * scale))
    # Only the TFDS catalogue datasets are mocked (the mock would replace toy and digits too).
    mock = tfds.testing.mock_data(num_examples=4096) if 'mock' in label else contextlib.nullcontext()
    with mock:
      dataset = datasets.get_dataset(name, split='train', batch_size=batch, data_dir=data_dir,
                                     shard_index=0, shard_count=1, **kwargs)
      if dataset.in_memory:   # the steady state: every example decoded once already
        for s in range(dataset.steps_per_epoch):
          dataset.batch(s)
      for workers in workers_list:
        for backend in ['pipeline'] + (['grain'] if grain and workers > 0 else []):
          skip = min(10, calls // 4)
          rate = pipeline_rate(dataset, workers, calls, skip=skip, backend=backend)
          rows.append(dict(data=label, batch_size=batch, workers=workers, backend=backend,
                           in_memory=dataset.in_memory, batches_timed=calls - skip,
                           examples_per_s=rate))
  for row in rows:
    base = next(r for r in rows if r['data'] == row['data'] and r['workers'] == 0)
    row['vs_one_thread'] = row['examples_per_s'] / base['examples_per_s']
  return rows


def step_alone(config, calls):
  """Seconds per training step of the compiled step, dispatched back to back."""
  comp = builder.build(config)
  mesh = parallel.make_mesh()
  step_fn, sharding = train_lib.compile_train_step(comp, config, mesh)
  state = jax.device_put(train_lib.init_state(config, comp),
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  k = config.training.steps_per_call
  batches = train_lib.global_batches(comp, 0, k, sharding)
  key = train_lib.train_key(config)
  state, loss = step_fn(state, batches, key)   # compiles
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for _ in range(calls):
    state, loss = step_fn(state, batches, key)
  jax.block_until_ready((state, loss))
  return (time.perf_counter() - t0) / (calls * k)


def loop_per_step(config, workdir, warm_steps):
  """Seconds per step of train_lib.train from its first log line at or past ``warm_steps``
  (after compilation and the first epoch, whose batches also decode examples into memory)
  to its last; and per step over its first epoch (from the first log line)."""
  train_lib.train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  warm = next(line for line in lines if line['step'] >= warm_steps)
  last = lines[-1]
  steady = (last['seconds'] - warm['seconds']) / (last['step'] - warm['step'])
  first_epoch = (warm['seconds'] - lines[0]['seconds']) / max(warm['step'] - lines[0]['step'], 1)
  return steady, first_epoch


def loop_rows(data_dir, quick, repeats):
  # (config, steps per call (None: the config's), log_freq, steps)
  cases = [('toy/mixture', None, 100, 1000 if quick else 4000),
           ('toy/mixture', 1, 100, 1000 if quick else 4000),
           ('vp/digits', None, 10, 60 if quick else 150)]
  rows = []
  for name, steps_per_call, log_freq, steps in cases:
    config = {'toy/mixture': mixture, 'vp/digits': digits}[name].get_config()
    config.data.data_dir = data_dir
    if steps_per_call is not None:
      config.training.steps_per_call = steps_per_call
    config.training.update(n_iters=steps, log_freq=log_freq, snapshot_freq=steps,
                           preemption_freq=10 * steps, snapshot_sampling=False)
    epoch = builder.dataset(config, 'train', config.training.batch_size, True).steps_per_epoch
    warm_steps = -(-(epoch + 1) // log_freq) * log_freq
    step_s, loop_s, first_s = [], [], []
    for r in range(repeats):   # interleaved, so that drifts of the machine hit both
      step_s.append(step_alone(config, steps // config.training.steps_per_call))
      with tempfile.TemporaryDirectory() as workdir:
        steady, first_epoch = loop_per_step(config, workdir, warm_steps)
      loop_s.append(steady)
      first_s.append(first_epoch)
    step, loop = float(np.median(step_s)), float(np.median(loop_s))
    rows.append(dict(config=name, batch_size=config.training.batch_size,
                     steps_per_call=config.training.steps_per_call, steps=steps,
                     steps_per_epoch=epoch, timed_from_step=warm_steps,
                     repeats=repeats, step_alone_ms=1e3 * step, loop_ms=1e3 * loop,
                     step_alone_ms_all=[1e3 * s for s in step_s],
                     loop_ms_all=[1e3 * s for s in loop_s], overhead=loop / step - 1,
                     first_epoch_loop_ms=1e3 * float(np.median(first_s))))
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='fewer batches and steps')
  parser.add_argument('--workers', default='0,1,2', help='worker counts to try')
  parser.add_argument('--repeats', type=int, default=3, help='loop-overhead repeats (median)')
  parser.add_argument('--skip_loop', action='store_true')
  parser.add_argument('--grain', action='store_true',
                      help="also time Grain's mp_prefetch on the same work (pip install grain)")
  args = parser.parse_args()
  worker_counts = [int(w) for w in args.workers.split(',')]
  with tempfile.TemporaryDirectory() as data_dir:
    p_rows = pipeline_rows(data_dir, worker_counts, args.quick, args.grain)
    l_rows = [] if args.skip_loop else loop_rows(data_dir, args.quick, args.repeats)

  print(f'devices: {jax.devices()}, {os.cpu_count()} CPU cores')
  print(f"\n{'data':<30} {'batch':>5} {'workers':>7} {'backend':>8} {'examples/s':>11} "
        f"{'vs in-process':>13}")
  for r in p_rows:
    print(f"{r['data']:<30} {r['batch_size']:>5} {r['workers']:>7} {r['backend']:>8} "
          f"{r['examples_per_s']:>11.0f} {r['vs_one_thread']:>13.2f}")
  cifar = [r for r in p_rows if r['data'].startswith('cifar10') and r['workers'] > 0
           and r['backend'] == 'pipeline']
  per_worker = max(r['examples_per_s'] / r['workers'] for r in cifar) if cifar else None
  cores = H100_IMAGES_PER_S / per_worker if per_worker else None
  if per_worker:
    print(f'\nCIFAR-10 (mock) per worker process: {per_worker:.0f} images/s -> {cores:.1f} worker '
          f'cores (plus the training process) to feed one H100 at {H100_IMAGES_PER_S} images/s')
  if l_rows:
    print(f"\n{'config':<12} {'batch':>5} {'steps/call':>10} {'step alone ms':>13} {'loop ms':>8} "
          f"{'overhead':>8} {'first epoch ms':>14}")
    for r in l_rows:
      print(f"{r['config']:<12} {r['batch_size']:>5} {r['steps_per_call']:>10} "
            f"{r['step_alone_ms']:>13.3f} {r['loop_ms']:>8.3f} {100 * r['overhead']:>7.1f}% "
            f"{r['first_epoch_loop_ms']:>14.3f}")
  common.write_result('input_pipeline_quick.json' if args.quick else 'input_pipeline.json',
                      quick=args.quick, pipeline=p_rows, loop=l_rows,
                      cifar10_images_per_s_per_worker=per_worker, cores_to_feed_one_h100=cores)


if __name__ == '__main__':
  main()
