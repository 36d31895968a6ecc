"""Soak test of fault tolerance: SIGKILL a training run and an evaluation many times, restart
each time with the same command, and check the end equals an uninterrupted run, bit for bit.

    python scripts/soak_test.py                # 20 training kills (10 while a checkpoint is
                                               # being written) and 6 evaluation kills
    python scripts/soak_test.py --train_kills 4 --eval_kills 2   # a quick look

Training kills come at steps spread over the run (a random moment after the restarted run
passes each target step and the step where the last one stopped); half of them wait for a
checkpoint being written (orbax's temporary directory of a new step present) and kill then.
Evaluation kills come at random moments of its first half (start-up, compiling, bits/dim), or
inside the sampling rounds (one or two rounds after those already saved). The final
parameters, EMA parameters and optimizer state, and every number of the report, must equal
those of the uninterrupted run. Prints a table of the kill points; writes
benchmarks/results/soak_test.json. Not part of the unit suite (several minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

CONFIG = os.path.join(ROOT, 'configs', 'toy', 'test.py')
TRAIN_FLAGS = ['--config.training.n_iters=1500', '--config.training.log_freq=10',
               '--config.training.preemption_freq=25', '--config.training.snapshot_freq=150',
               '--config.training.snapshot_sampling=False']
# Ten sampling rounds of 500 samples, each long enough (5 corrector steps per level) for a
# kill to land between two rounds.
EVAL_FLAGS = ['--config.eval.begin_ckpt=1500', '--config.sampling.num_samples=5000',
              '--config.sampling.batch_size=500', '--config.sampling.n_steps_each=5',
              '--config.eval.bpd_max_examples=200']


def command(workdir, data_dir, mode):
  return ([sys.executable, os.path.join(ROOT, 'main.py'), '--config', CONFIG, '--mode', mode,
           '--workdir', workdir, f'--config.data.data_dir={data_dir}'] + TRAIN_FLAGS
          + (EVAL_FLAGS if mode == 'eval' else []))


def start(cmd):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def last_logged_step(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  try:
    return json.loads(lines[-1])['step'] if lines else 0
  except ValueError:   # a line being written
    return json.loads(lines[-2])['step'] if len(lines) > 1 else 0


def checkpoint_being_written(workdir, after_step):
  """The temporary directory orbax writes a checkpoint of a step past ``after_step`` into
  before renaming it, if any (an earlier killed run may have left older ones behind)."""
  for kind in ('snapshots', 'preemption'):
    d = os.path.join(workdir, 'checkpoints', kind)
    if os.path.isdir(d):
      for name in os.listdir(d):
        step = name.split('.')[0]
        if 'tmp' in name and step.isdigit() and int(step) > after_step:
          return f'{kind}/{name}'
  return None


def rounds_done(workdir):
  d = os.path.join(workdir, 'eval')
  if not os.path.isdir(d):
    return 0
  return sum(len([f for f in os.listdir(os.path.join(d, r)) if f.endswith('.npz')])
             for r in os.listdir(d) if r.startswith('rounds_'))


def finish(proc, what):
  _, err = proc.communicate(timeout=1800)
  if proc.returncode != 0:
    raise SystemExit(f'{what} failed (exit {proc.returncode}):\n{err}')


def kill_training(workdir, data_dir, target, at_checkpoint, rng):
  """Runs until this run has logged a step past ``target`` (and past where the last run
  stopped), then kills at a random moment, or at the next checkpoint write. Returns the kill
  point, or None if the run ended first."""
  before = last_logged_step(workdir)
  proc = start(command(workdir, data_dir, 'train'))
  t0 = time.time()
  while proc.poll() is None and last_logged_step(workdir) <= max(target, before):
    time.sleep(0.002)
  writing = None
  if at_checkpoint:
    while proc.poll() is None and writing is None:
      writing = checkpoint_being_written(workdir, before)
      time.sleep(0.0005)
  else:
    time.sleep(rng.uniform(0, 0.05))
    writing = checkpoint_being_written(workdir, before)
  if proc.poll() is not None:
    finish(proc, 'training')
    return None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return {'phase': 'train', 'trigger': 'checkpoint write' if at_checkpoint else 'random moment',
          'target_step': int(target), 'logged_step': int(last_logged_step(workdir)),
          'seconds_after_start': round(time.time() - t0, 2), 'writing': writing or '-'}


def kill_eval(workdir, data_dir, delay, rounds):
  """Kills the evaluation ``delay`` seconds after it starts or, with ``rounds``, a random
  moment after that many sampling rounds are saved."""
  if rounds is not None:   # rounds an earlier run saved are read back, not drawn again
    rounds += rounds_done(workdir)
  proc = start(command(workdir, data_dir, 'eval'))
  t0 = time.time()
  while proc.poll() is None and (time.time() - t0 < delay if rounds is None
                                 else rounds_done(workdir) < rounds):
    time.sleep(0.005)
  if rounds is not None:
    time.sleep(delay)
  if proc.poll() is not None:
    finish(proc, 'eval')
    return None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return {'phase': 'eval', 'trigger': 'random moment' if rounds is None else 'after rounds',
          'target_step': '-' if rounds is None else f'{rounds} rounds',
          'logged_step': f'{rounds_done(workdir)} rounds saved',
          'seconds_after_start': round(time.time() - t0, 2), 'writing': '-'}


def final_state(workdir, data_dir):
  import builder
  import eval_lib
  from configs.toy import test
  config = test.get_config()
  config.data.data_dir = data_dir
  comp = builder.build(config)
  state, step = eval_lib.restore_for_eval(config, comp, workdir)
  import jax
  return step, [np.asarray(x) for x in jax.tree.leaves(state)]


def numbers(report):
  """The report's numbers (paths differ between workdirs)."""
  return {k: v for k, v in report.items() if not isinstance(v, str)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train_kills', type=int, default=20)
  parser.add_argument('--eval_kills', type=int, default=6)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  root = tempfile.mkdtemp(prefix='soak_')
  data_dir = os.path.join(root, 'data')
  reference, soaked = os.path.join(root, 'reference'), os.path.join(root, 'soaked')

  t = time.time()
  finish(start(command(reference, data_dir, 'train')), 'the uninterrupted training')
  train_seconds = time.time() - t
  t = time.time()
  finish(start(command(reference, data_dir, 'eval')), 'the uninterrupted eval')
  eval_seconds = time.time() - t
  print(f'uninterrupted: training {train_seconds:.0f} s, eval {eval_seconds:.0f} s')

  n_iters = 1500
  targets = np.sort(rng.uniform(0, n_iters * 0.95, args.train_kills)).astype(int)
  at_checkpoint = rng.permutation([i < args.train_kills // 2 for i in range(args.train_kills)])
  kills = []
  for target, at_ckpt in zip(targets, at_checkpoint):
    point = kill_training(soaked, data_dir, target, bool(at_ckpt), rng)
    if point is not None:
      kills.append(point)
  finish(start(command(soaked, data_dir, 'train')), 'the restarted training')
  # Half at random moments (start-up, compiling, bits/dim), half inside the sampling rounds.
  for i in range(args.eval_kills):
    if i % 2 == 0:
      point = kill_eval(soaked, data_dir, rng.uniform(1.0, 0.5 * eval_seconds), None)
    else:   # one or two rounds past those already saved
      point = kill_eval(soaked, data_dir, rng.uniform(0, 0.1), int(rng.integers(1, 3)))
    if point is not None:
      kills.append(point)
  finish(start(command(soaked, data_dir, 'eval')), 'the restarted eval')

  step_ref, state_ref = final_state(reference, data_dir)
  step_soak, state_soak = final_state(soaked, data_dir)
  params_equal = step_ref == step_soak and all(
      a.shape == b.shape and np.array_equal(a, b) for a, b in zip(state_ref, state_soak))
  with open(os.path.join(reference, 'eval', f'report_{n_iters}.json')) as f:
    report_ref = numbers(json.load(f))
  with open(os.path.join(soaked, 'eval', f'report_{n_iters}.json')) as f:
    report_soak = numbers(json.load(f))
  report_equal = report_ref == report_soak

  header = f"{'#':>3} {'phase':6} {'trigger':17} {'target':>9} {'at':>22} {'s':>6}  writing"
  print(header)
  for i, k in enumerate(kills):
    print(f"{i + 1:>3} {k['phase']:6} {k['trigger']:17} {k['target_step']!s:>9} "
          f"{k['logged_step']!s:>22} {k['seconds_after_start']:>6}  {k['writing']}")
  train_kills = [k for k in kills if k['phase'] == 'train']
  during_writes = sum(k['writing'] != '-' for k in train_kills)
  print(f'{len(train_kills)} training kills ({during_writes} while a checkpoint was being '
        f"written), {len(kills) - len(train_kills)} eval kills; final parameters "
        f"{'bit-identical' if params_equal else 'DIFFERENT'}; report "
        f"{'identical' if report_equal else 'DIFFERENT'}")
  from benchmarks.common import write_result
  write_result('soak_test.json', kills=kills, params_bit_identical=params_equal,
               report_identical=report_equal, train_kills=len(train_kills),
               kills_during_checkpoint_writes=during_writes,
               uninterrupted_seconds={'train': train_seconds, 'eval': eval_seconds},
               command=' '.join(sys.argv))
  eval_kills = len(kills) - len(train_kills)
  if len(train_kills) != args.train_kills or eval_kills != args.eval_kills:
    print(f'only {len(train_kills)} of {args.train_kills} training kills and {eval_kills} of '
          f'{args.eval_kills} evaluation kills landed before the run ended')
  if not (params_equal and report_equal) or len(kills) != args.train_kills + args.eval_kills:
    sys.exit(1)


if __name__ == '__main__':
  main()
