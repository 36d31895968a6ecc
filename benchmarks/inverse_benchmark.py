#!/usr/bin/env python
"""Inverse-problem benchmark: posterior calibration on the mixture, fidelity on digits.

Part 1, calibration (always; the exact score of the 2-D mixture, so only the method errs):
for each SDE x method x case, 2000 posterior samples against the exact posterior mixture
(gaussian_mixture.GaussianMixture.posterior): energy distance (beside that of two exact
sample sets, the floor), the largest mode-weight error, and the std of the residual y - A x
beside the exact posterior's. Cases: 'mask' (x_0 = 1.5 observed, noiseless) and
'noisy_row' (0.6 x_0 + 0.8 x_1 = -1.3 with noise std 0.2). N = 500 steps.

Part 2, digits (with --digits SDE=WORKDIR ...: trained score models, e.g. from
`python main.py --config configs/vp/digits.py --workdir WORKDIR --mode train`): for each
task x method, ``--mode inverse`` (inverse_lib.inverse) on the first --num_examples test
digits with --samples samples each and --num_scales steps: PSNR and SSIM of the samples and
of the posterior mean, data consistency, NFE and wall time, with the three score-free
baselines of the same measurements.

Usage (from the repository root):
  python benchmarks/inverse_benchmark.py                              # calibration only
  python benchmarks/inverse_benchmark.py --digits vpsde=runs/digits_vp --tasks inpainting,ct
Writes benchmarks/results/inverse.json (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import controllable_generation as cg  # noqa: E402
import eval_lib  # noqa: E402
import gaussian_mixture  # noqa: E402
import sde_lib  # noqa: E402

CASES = {
    'mask': (lambda: cg.Inpainting(np.array([True, False])), [[1.0, 0.0]], 1.5, 0.0),
    'noisy_row': (lambda: cg.MatrixOperator([[0.6, 0.8]]), [[0.6, 0.8]], -1.3, 0.2),
}
METHOD_OPTIONS = {'imputation': {}, 'projection': {'weight': 1.0}, 'dps': {'step_size': 0.03},
                  'moment_matching': {'cg_iters': 50}}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sdes', default='vesde,vpsde,subvpsde')
  p.add_argument('--methods', default=','.join(cg.INVERSE_METHODS))
  p.add_argument('--num_samples', type=int, default=2000)
  p.add_argument('--no_calibration', action='store_true', help='digits only')
  p.add_argument('--digits', nargs='*', default=[], help='SDE=WORKDIR of trained digits models')
  p.add_argument('--tasks', default='inpainting,super_resolution,compressed_sensing,mri,ct')
  p.add_argument('--digits_methods', default='projection,dps,moment_matching')
  p.add_argument('--num_examples', type=int, default=8)
  p.add_argument('--samples', type=int, default=4)
  p.add_argument('--num_scales', type=int, default=500)
  p.add_argument('--dps_step_size', type=float, default=0.3)
  p.add_argument('--noise_std', type=float, default=0.0)
  p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               'results', 'inverse.json'))
  return p.parse_args(argv)


def calibration(args):
  mix = gaussian_mixture.two_dimensional_example()
  n, rows = args.num_samples, []
  for case, (make_op, matrix, y_value, noise_std) in CASES.items():
    post = mix.posterior(matrix, [y_value], noise_std)
    truth = post.sample(jax.random.PRNGKey(1), n)
    floor = eval_lib.energy_distance(truth, post.sample(jax.random.PRNGKey(2), n))
    a = np.asarray(matrix, np.float32)
    truth_res = float(np.std(y_value - np.asarray(truth) @ a.T))
    for sde_name in args.sdes.split(','):
      sde = sde_lib.get_sde(sde_name, N=500)
      for method in args.methods.split(','):
        if method == 'imputation' and noise_std > 0:
          continue
        sampler = cg.get_inverse_sampler(sde, make_op(), (n, 2), method, noise_std=noise_std,
                                         **METHOD_OPTIONS[method])
        y = jnp.full((n, 1), y_value)
        sampler(jax.random.PRNGKey(3), mix.score_fn(sde), y)[0].block_until_ready()   # compile
        t0 = time.time()
        x, nfe = sampler(jax.random.PRNGKey(4), mix.score_fn(sde), y)
        x = np.asarray(x)
        wall = time.time() - t0
        w = np.bincount(np.asarray(mix.assign(jnp.asarray(x))), minlength=3) / n
        rows.append(dict(case=case, sde=sde_name, method=method, noise_std=noise_std,
                         energy_distance=eval_lib.energy_distance(x, truth), floor=floor,
                         weight_error=float(np.max(np.abs(w - np.asarray(post.weights)))),
                         weights=w.tolist(), exact_weights=np.asarray(post.weights).tolist(),
                         residual_std=float(np.std(y_value - x @ a.T)),
                         exact_residual_std=truth_res, nfe=int(nfe), wall_seconds=wall))
        r = rows[-1]
        print(f"{case:<10} {sde_name:<9} {method:<16} ED {r['energy_distance']:.4f} "
              f"(floor {floor:.4f})  weights err {r['weight_error']:.3f}  residual std "
              f"{r['residual_std']:.4f} (exact {truth_res:.4f})  NFE {nfe}  {wall:.2f} s", flush=True)
  return rows


def digits(args):
  import inverse_lib
  from configs.subvp import digits as subvp_digits
  from configs.ve import digits as ve_digits
  from configs.vp import digits as vp_digits
  configs = {'vpsde': vp_digits, 'vesde': ve_digits, 'subvpsde': subvp_digits}
  rows = []
  for spec in args.digits:
    sde_name, workdir = spec.split('=', 1)
    for task in args.tasks.split(','):
      for method in args.digits_methods.split(','):
        config = configs[sde_name].get_config()
        config.sde.num_scales = args.num_scales
        config.inverse.update(task=task, method=method, num_examples=args.num_examples,
                              samples_per_example=args.samples, noise_std=args.noise_std,
                              step_size=args.dps_step_size)
        report = json.load(open(inverse_lib.inverse(config, workdir)))
        report['sde'] = sde_name
        rows.append(report)
        b = report['baselines']
        print(f"{sde_name:<9} {task:<18} {method:<16} PSNR {report['samples']['psnr']:6.2f} "
              f"(mean {report['posterior_mean']['psnr']:6.2f})  SSIM {report['samples']['ssim']:.3f}  "
              f"consistency {report['consistency_rms']:.4f}  NFE {report['nfe']}  "
              f"{report['wall_seconds']:.1f} s | baselines PSNR pinv "
              f"{b['pseudo_inverse']['psnr']:.2f} mean-fill {b['mean_fill']['psnr']:.2f} "
              f"nearest {b['nearest_training_image']['psnr']:.2f}", flush=True)
  return rows


def main(argv=None):
  args = parse_args(argv)
  result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'device': str(jax.devices()[0].device_kind), 'platform': platform.platform(),
            'jax': jax.__version__, 'args': vars(args)}
  if not args.no_calibration:
    print('Calibration on the 2-D mixture (exact score; exact posterior):')
    result['calibration'] = calibration(args)
  if args.digits:
    print('\nDigits:')
    result['digits'] = digits(args)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'\nWrote {args.out}')


if __name__ == '__main__':
  main()
