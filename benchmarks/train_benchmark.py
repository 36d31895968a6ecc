#!/usr/bin/env python
"""Training throughput of the toy and digits configs, and the wall time of the README's first command.

For each config: steps per second of the compiled, sharded train step (after a warm-up
call that compiles), with 1 and with 10 steps per compiled call; the baseline is one
step per call in the same run. On CPU the steps of a call are unrolled (train_lib's
default there); the 'rolled' rows run the same steps inside a loop (lax.scan without
unrolling, the default on accelerators), to measure what unrolling buys on this backend.
Then, unless --skip_readme, the README's first command is run in a fresh workdir and
timed end to end (train, evaluate, sample, picture).

Usage (repository root):  python benchmarks/train_benchmark.py [--skip_readme]
Writes benchmarks/results/train.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import builder  # noqa: E402
import common  # noqa: E402  (benchmarks/common.py)
import parallel  # noqa: E402
import train_lib  # noqa: E402
from configs.toy import mixture  # noqa: E402
from configs.vp import digits  # noqa: E402

README_COMMAND = [sys.executable, 'main.py', '--config', 'configs/toy/mixture.py', '--mode', 'all']


def steps_per_second(config, steps, steps_per_call, unroll=None):
  config.training.steps_per_call = steps_per_call
  comp = builder.build(config)
  mesh = parallel.make_mesh()
  step_fn, sharding = train_lib.compile_train_step(comp, config, mesh, unroll)
  state = jax.device_put(train_lib.init_state(config, comp), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  key = train_lib.train_key(config)
  state, loss = step_fn(state, train_lib.global_batches(comp, 0, steps_per_call, sharding), key)   # compile
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  done = 0
  while done < steps:
    batches = train_lib.global_batches(comp, steps_per_call + done, steps_per_call, sharding)
    state, loss = step_fn(state, batches, key)
    np.asarray(loss)   # the training loop reads the loss every call (NaN check)
    done += steps_per_call
  return done / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--skip_readme', action='store_true')
  args = parser.parse_args()
  rows = []
  # (config, get_config, steps timed, steps per call, loop): the rolled digits row is slow
  # on CPU (several seconds a step), so it times few steps.
  cases = [('toy/mixture', mixture.get_config, 400, 1, 'default'),
           ('toy/mixture', mixture.get_config, 400, 10, 'default'),
           ('toy/mixture', mixture.get_config, 400, 10, 'rolled'),
           ('vp/digits', digits.get_config, 40, 1, 'default'),
           ('vp/digits', digits.get_config, 40, 10, 'default'),
           ('vp/digits', digits.get_config, 3, 1, 'rolled')]
  for name, get_config, steps, k, loop in cases:
    config = get_config()
    rate = steps_per_second(config, steps, k, unroll=False if loop == 'rolled' else None)
    rows.append(dict(config=name, batch_size=config.training.batch_size, steps_per_call=k,
                     loop=loop, steps_timed=steps, steps_per_s=rate,
                     examples_per_s=rate * config.training.batch_size))
  for row in rows:
    base = next(r for r in rows if r['config'] == row['config'] and r['steps_per_call'] == 1
                and r['loop'] == 'default')
    row['speedup_vs_baseline'] = row['steps_per_s'] / base['steps_per_s']
  readme = None
  if not args.skip_readme:
    with tempfile.TemporaryDirectory() as workdir:
      t0 = time.perf_counter()
      proc = subprocess.run(README_COMMAND + ['--workdir', workdir], cwd=ROOT, capture_output=True, text=True)
      readme = dict(command=' '.join(README_COMMAND[1:]) + ' --workdir DIR', seconds=time.perf_counter() - t0,
                    returncode=proc.returncode)
  print(f'devices: {jax.devices()}  (baseline: 1 step per call, default loop)')
  print(f"{'config':<12} {'batch':>5} {'steps/call':>10} {'loop':>8} {'steps/s':>9} {'examples/s':>11} "
        f"{'vs baseline':>11}")
  for r in rows:
    print(f"{r['config']:<12} {r['batch_size']:>5} {r['steps_per_call']:>10} {r['loop']:>8} "
          f"{r['steps_per_s']:>9.2f} {r['examples_per_s']:>11.0f} {r['speedup_vs_baseline']:>11.2f}")
  if readme:
    print(f"README command: {readme['seconds']:.0f} s (exit {readme['returncode']})")
  common.write_result('train.json', rows=rows, readme_command=readme)


if __name__ == '__main__':
  main()
