#!/usr/bin/env python
"""CPU time XLA:CPU spends compiling the programs the tests compile, under sets of XLA flags.

The test suite is bound by compiling (thousands of small programs on 2 cores), so the flags
its conftest.py sets are chosen here. Each flag set runs in its own process (XLA reads its
flags once), with the persistent compilation cache off and, as in the tests, XLA's
optimizations mostly off (--optimized turns them on). The programs: the train step and the
sampler of three tiny networks (NCSNv2 and NCSN++ at 16x16 as the tiny paper-config test,
the digits U-Net) and of the toy MLP, and three fast samplers on the 2-D mixture. Each flag
set is measured --repeats times, interleaved with the others; the table gives the median
CPU seconds of each program and the ratio of the total to the first set (XLA's defaults),
measured in the same run.

Usage (repository root):  python benchmarks/compile_benchmark.py [--repeats 2] [--optimized]
Writes benchmarks/results/compile.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAG_SETS = {
    'defaults': '',
    'loop emitters': '--xla_cpu_use_fusion_emitters=false',
    'loop emitters, one piece': ('--xla_cpu_use_fusion_emitters=false '
                                 '--xla_cpu_parallel_codegen_split_count=1'),
}


def _tiny_configs(data_dir):
  """The networks of the tests at their tests' sizes, from the tests' own helpers."""
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  import run_helpers
  return {'ncsnv2': run_helpers.tiny_paper_config('ve.ncsnv2.cifar10', data_dir),
          'ncsnpp': run_helpers.tiny_paper_config('ve.cifar10_ncsnpp_continuous', data_dir),
          'digits': run_helpers.tiny_digits_config(data_dir),
          'toy': run_helpers.toy_config(data_dir)}


def child(data_dir):
  """Lowers every program, then compiles each; prints {program: CPU seconds} as JSON."""
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  jax.config.update('jax_enable_compilation_cache', False)
  import builder
  import gaussian_mixture
  import sampling
  import sde_lib
  import train_lib

  lowered = {}
  for name, config in _tiny_configs(data_dir).items():
    comp = builder.build(config)
    state = jax.eval_shape(lambda: train_lib.init_state(config, comp))
    batch = jax.eval_shape(lambda: jax.tree.map(lambda a: jnp.asarray(a)[None],
                                                comp.train_data.batch(0)))
    step = jax.jit(train_lib.make_train_step(comp, config.model.ema_rate, True))
    lowered[f'{name} train step'] = step.lower(state, batch, train_lib.train_key(config))
    sample = jax.jit(lambda key, params, comp=comp: comp.sampler(key, comp.score_fn(params)))
    lowered[f'{name} sampler'] = sample.lower(jax.random.PRNGKey(0), state.params)
  mix = gaussian_mixture.two_dimensional_example()
  sde = sde_lib.VPSDE()
  for name in ('heun', 'dpm_solver_3m', 'unipc'):
    sampler = sampling.get_sampler(name, sde, (100, 2), steps=8)
    lowered[f'{name} (mixture)'] = jax.jit(
        lambda key, s=sampler: s(key, mix.score_fn(sde))).lower(jax.random.PRNGKey(0))
  out = {}
  for name, program in lowered.items():
    t0 = time.process_time()
    program.compile()
    out[name] = time.process_time() - t0
  print('RESULT ' + json.dumps(out))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--optimized', action='store_true',
                      help="XLA's optimizations on (users' runs); off by default, as in the tests")
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    child(args.child)
    return

  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import common  # benchmarks/common.py

  runs = {name: [] for name in FLAG_SETS}
  with tempfile.TemporaryDirectory() as data_dir:
    for _ in range(args.repeats):
      for name, flags in FLAG_SETS.items():
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu',
                   JAX_DISABLE_MOST_OPTIMIZATIONS='0' if args.optimized else '1')
        result = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', data_dir],
                                env=env, capture_output=True, text=True, cwd=ROOT, check=False)
        lines = [l for l in result.stdout.splitlines() if l.startswith('RESULT ')]
        if result.returncode or not lines:
          raise RuntimeError(f'flag set {name!r} failed:\n{result.stdout}\n{result.stderr}')
        runs[name].append(json.loads(lines[-1][len('RESULT '):]))

  programs = list(runs['defaults'][0])
  median = {name: {p: statistics.median(r[p] for r in rs) for p in programs}
            for name, rs in runs.items()}
  totals = {name: sum(m.values()) for name, m in median.items()}
  names = list(FLAG_SETS)
  print(f'\nCompile CPU seconds (median of {args.repeats}), optimizations '
        f'{"on" if args.optimized else "mostly off"}')
  print(f'{"program":24s}' + ''.join(f'{n:>26s}' for n in names))
  for p in programs:
    print(f'{p:24s}' + ''.join(f'{median[n][p]:26.2f}' for n in names))
  print(f'{"total":24s}' + ''.join(f'{totals[n]:26.2f}' for n in names))
  print(f'{"ratio to defaults":24s}' + ''.join(f'{totals[n] / totals["defaults"]:26.2f}' for n in names))
  common.write_result('compile_optimized.json' if args.optimized else 'compile.json',
                      flag_sets=FLAG_SETS, repeats=args.repeats, optimized=args.optimized,
                      median_cpu_seconds=median, total_cpu_seconds=totals,
                      ratio_to_defaults={n: totals[n] / totals['defaults'] for n in names},
                      runs=runs)


if __name__ == '__main__':
  main()
