"""Does the PyTorch reference's EMA warm-up matter? The default toy run with and without it.

score_sde (JAX) keeps a fixed EMA decay; score_sde_pytorch warms it up as
min(rate, (1 + n) / (10 + n)). A fixed rate r keeps a share r^n of the random
initialization in the EMA after n steps. This trains configs/toy/mixture.py both ways
(same seed, same data) and evaluates every snapshot: test log-likelihood (true density:
the ceiling) and energy distance of samples (two true sample sets: the floor).

  python benchmarks/ema_warmup_benchmark.py [--out benchmarks/results/ema_warmup.json]
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_lib  # noqa: E402
from configs.toy import mixture  # noqa: E402


def run(warmup: bool, workdir: str):
  config = mixture.get_config()
  config.model.ema_warmup = warmup
  start = time.time()
  run_lib.run(config, workdir, 'all')
  rows = []
  for name in sorted(os.listdir(os.path.join(workdir, 'eval'))):
    if name.startswith('report_') and name.endswith('.json'):
      r = json.load(open(os.path.join(workdir, 'eval', name)))
      rows.append({'ema_warmup': warmup, 'step': r['step'],
                   'init_share_in_ema': 0.0 if warmup else config.model.ema_rate ** r['step'],
                   'test_logp_model': r['test_logp_model'], 'test_logp_true': r['test_logp_true'],
                   'energy_distance_model': r['energy_distance_model'],
                   'energy_distance_true_vs_true': r['energy_distance_true_vs_true']})
  return sorted(rows, key=lambda r: r['step']), time.time() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                    'ema_warmup.json'))
  args = parser.parse_args()
  rows = []
  for warmup in (False, True):
    with tempfile.TemporaryDirectory() as workdir:
      r, seconds = run(warmup, workdir)
      rows += r
      print(f'ema_warmup={warmup}: {seconds:.0f} s', file=sys.stderr)
  print('| EMA warm-up | step | init share in EMA | test log p model (true) | energy distance model (true vs true) |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(f"| {'yes' if r['ema_warmup'] else 'no'} | {r['step']} | {r['init_share_in_ema']:.3f} | "
          f"{r['test_logp_model']:.3f} ({r['test_logp_true']:.3f}) | "
          f"{r['energy_distance_model']:.4f} ({r['energy_distance_true_vs_true']:.4f}) |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
