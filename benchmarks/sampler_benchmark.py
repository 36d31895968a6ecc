#!/usr/bin/env python
"""Sampler benchmark: sample quality against score evaluations (NFE), every sampler, one run.

Part 1, the 2-D mixture with its exact score (only the sampler errs), for VE, VP and sub-VP:
  - PC (reverse diffusion, with and without the Langevin corrector, snr 0.16) at N = 100 ... 1000;
  - the adaptive probability-flow ODE (dopri5) at tolerances 1e-1 ... 1e-5;
  - DDIM, EDM's Heun, DPM-Solver++ (2M, 3M, 2S) and UniPC at 5 ... 50 steps, default grids;
measured by the energy distance of --num_samples samples to a true set of the same size (beside
the distance between two true sets, the floor), the largest mode-weight error, and for the
deterministic solvers the RMS distance to the probability-flow ODE's endpoint from the same
prior draw, solved in float64 at tolerance 1e-10 (the error of the solver itself).

Part 2, digits (with --digits WORKDIR, a trained model, e.g. `python main.py --config
configs/vp/digits.py --workdir WORKDIR --mode train --config.training.n_iters=6000`; the SDE is
the config's, --config): digits-FID and KID (the embedded digits classifier's features, the
eval mode's protocol) of --digits_samples samples per setting, PC at N = 100 ... 1000 against
the fast solvers at 5 ... 50 steps, and the smallest NFE at which each reaches PC's FID at
2000 NFE.

Usage (from the repository root):
  python benchmarks/sampler_benchmark.py                                  # the mixture only
  python benchmarks/sampler_benchmark.py --digits runs/digits_vp --config configs/vp/digits.py
Writes benchmarks/results/samplers.json (or --out) and a plot beside it (--plot).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

FAST = ('ddim', 'heun', 'dpm_solver_2m', 'dpm_solver_3m', 'dpm_solver_2s', 'unipc')
TWO_EVALS = ('heun', 'dpm_solver_2s')
EPS = {'vesde': 1e-5, 'vpsde': 1e-3, 'subvpsde': 1e-3}   # the configs' sampling.eps


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  here = os.path.dirname(os.path.abspath(__file__))
  p.add_argument('--num_samples', type=int, default=2000)
  p.add_argument('--pc_steps', default='100,200,500,1000')
  p.add_argument('--tolerances', default='1e-1,1e-2,1e-3,1e-4,1e-5')
  p.add_argument('--nfe', default='5,10,15,20,30,50',
                 help='NFE budgets of the fast solvers (steps = what fits, with the denoise)')
  p.add_argument('--sdes', default='vesde,vpsde,subvpsde')
  p.add_argument('--digits', default='', help='workdir of a trained digits model')
  p.add_argument('--config', default='configs/vp/digits.py')
  p.add_argument('--digits_samples', type=int, default=1000)
  p.add_argument('--digits_pc_steps', default='100,250,500,1000')
  p.add_argument('--digits_extra', action='store_true',
                 help='instead of the sweep: the stochastic solvers (DDIM eta = 1, Heun with '
                      'churn), the FID spread of DPM-Solver++(2M) at 20 NFE over 5 seeds, and '
                      'PC at 2000 NFE and the ODE at 1e-5 on further seeds')
  p.add_argument('--mixture_from', default='',
                 help='take part 1 from this JSON of an earlier run instead of running it')
  p.add_argument('--out', default=os.path.join(here, 'results', 'samplers.json'))
  p.add_argument('--plot', default=os.path.join(here, 'results', 'samplers.png'))
  return p.parse_args(argv)


def steps_for(sampler, nfe):
  """Steps of a fast solver whose NFE (with the final denoise) is at most ``nfe``."""
  per_step = 2 if sampler in TWO_EVALS else 1
  return (nfe - 1) // per_step


def _settings(args):
  """(label, sampler name, options) of every setting, PC, ODE and the fast solvers."""
  out = []
  for n in map(int, args.pc_steps.split(',')):
    out.append(('pc', 'pc', dict(steps=n)))
    out.append(('pc, no corrector', 'pc', dict(steps=n, corrector='none')))
  for tol in map(float, args.tolerances.split(',')):
    out.append(('ode (adaptive)', 'ode', dict(rtol=tol, atol=tol, denoise=True)))
  for name in FAST:
    for nfe in map(int, args.nfe.split(',')):
      if steps_for(name, nfe) >= 1:
        out.append((name, name, dict(steps=steps_for(name, nfe))))
  return out


def mixture(args):
  """Part 1. Runs in float64 (the mixture's score is cheap): the reference endpoint is exact."""
  jax.config.update('jax_enable_x64', True)
  import eval_lib
  import gaussian_mixture
  import sampling
  import sde_lib
  mix = gaussian_mixture.two_dimensional_example()
  n = args.num_samples
  true = mix.sample(jax.random.PRNGKey(100), n)
  floor = float(eval_lib.energy_distance(mix.sample(jax.random.PRNGKey(101), n), true))
  print(f'floor (two true sets of {n}): energy distance {floor:.5f}')
  rows = []
  for sde_name in args.sdes.split(','):
    sde = sde_lib.get_sde(sde_name, N=1000)
    eps = EPS[sde_name]
    key = jax.random.PRNGKey(7)
    ref, _ = sampling.get_sampler('ode', sde, (n, 2), eps=eps, rtol=1e-10, atol=1e-10,
                                  max_steps=100_000)(key, mix.score_fn(sde))
    for label, name, options in _settings(args):
      sampler = sampling.get_sampler(name, sde, (n, 2), eps=eps, **options)
      t0 = time.perf_counter()
      x, nfe = sampler(key, mix.score_fn(sde))
      x = np.asarray(x)
      seconds = time.perf_counter() - t0
      weights = np.bincount(np.asarray(mix.assign(x)), minlength=3) / n
      row = dict(sde=sde_name, sampler=label, options=options, nfe=int(nfe),
                 energy_distance=float(eval_lib.energy_distance(x, true)), floor=floor,
                 weight_error=float(np.abs(weights - np.asarray(mix.weights)).max()),
                 seconds_with_compile=seconds)
      deterministic = (name in FAST and not options.get('eta') and not options.get('churn'))
      if deterministic:
        # The denoise is a step to sigma = 0 that the ODE reference does not take: compare
        # the solver without it, at its own endpoint eps.
        plain, _ = sampling.get_sampler(name, sde, (n, 2), eps=eps, denoise=False,
                                        **options)(key, mix.score_fn(sde))
        row['rms_to_ode_endpoint'] = float(np.sqrt(np.mean((np.asarray(plain) - ref)**2)))
      rows.append(row)
      extra = (f"  rms to ODE {row['rms_to_ode_endpoint']:.2e}" if deterministic else '')
      print(f"{sde_name:<9} {label:<17} {str(options):<42} NFE {row['nfe']:5d}  "
            f"ED {row['energy_distance']:.5f}  w-err {row['weight_error']:.3f}{extra}", flush=True)
  jax.config.update('jax_enable_x64', False)
  jax.clear_caches()
  return dict(floor=floor, rows=rows)


def digits(args):
  """Part 2: digits-FID/KID of each setting, with the eval mode's features and reference."""
  import builder
  import datasets
  import eval_lib
  import evaluation
  import sampling
  spec = importlib.util.spec_from_file_location('bench_config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.sampling.num_samples = args.digits_samples
  config.eval.enable_bpd = False
  comp = builder.build(config)
  state, step = eval_lib.restore_for_eval(config, comp, args.digits)
  context = eval_lib.eval_context(config, comp, args.digits)
  ev = context.evaluator
  inverse = datasets.inverse_scaler(config.data.centered)
  names = eval_lib.sample_metric_names(config)
  ec = config.eval
  shape = (config.sampling.batch_size,) + tuple(comp.data_shape)
  settings = [(label, name, options) for label, name, options in _settings(args)
              if name != 'pc']
  settings = ([('pc', 'pc', dict(steps=n)) for n in map(int, args.digits_pc_steps.split(','))]
              + [s for s in settings if s[1] != 'ode'] + [s for s in settings if s[1] == 'ode'])
  seeds = {}
  if args.digits_extra:
    settings = ([('ddim, eta = 1', 'ddim', dict(eta=1.0, steps=n)) for n in (19, 49, 99, 199)]
                + [('heun, churn = 20', 'heun', dict(churn=20.0, steps=n)) for n in (9, 24, 49, 99)]
                + [('dpm_solver_2m, seed %d' % k, 'dpm_solver_2m', dict(steps=19)) for k in range(5)]
                + [('pc, seed 1', 'pc', dict(steps=1000))]
                + [('ode (adaptive), seed %d' % k, 'ode', dict(rtol=1e-5, atol=1e-5, denoise=True))
                   for k in (1, 2)])
    seeds = {label: int(label.rsplit(' ', 1)[1]) for label, _, _ in settings if 'seed' in label}

  def features(x, r):     # what the eval mode keeps of a round: features and logits
    f, logits = ev(evaluation.quantize_samples(inverse(x)))
    return np.concatenate([f, logits], axis=-1)

  rows = []
  baselines = context.sample_baselines or {}
  for label, name, options in settings:
    kwargs = dict(options)
    if name == 'pc':
      kwargs.update(predictor=config.sampling.predictor, corrector=config.sampling.corrector,
                    snr=config.sampling.snr, n_steps=config.sampling.n_steps_each)
    sampler = sampling.get_sampler(name, comp.sde, shape, eps=config.sampling.eps, **kwargs)
    t0 = time.perf_counter()
    # The eval mode's rounds (round r draws with fold_in(key, r)), with this setting's sampler.
    out, nfe = eval_lib.sample_rounds(
        config, comp._replace(sampler=sampler), state.ema_params,
        jax.random.PRNGKey(11 + 1000 * seeds.get(label, 0)), args.digits_samples, features,
        (ev.feature_dim + ev.num_classes,))
    seconds = time.perf_counter() - t0
    out = np.concatenate(out)
    metrics = evaluation.sample_metrics(out[:, :ev.feature_dim], out[:, ev.feature_dim:],
                                        context.reference, metrics=names,
                                        kid_subsets=ec.kid_subsets,
                                        kid_subset_size=min(ec.kid_subset_size, len(out)),
                                        is_splits=ec.is_splits, seed=0)
    row = dict(sampler=label, options=options, nfe=int(nfe), seconds=seconds, **metrics)
    rows.append(row)
    print(f"digits {label:<17} {str(options):<42} NFE {row['nfe']:5d}  FID {row['fid']:.3f}  "
          f"KID {row['kid']:.5f}  {seconds:.1f} s", flush=True)
  if args.digits_extra:
    spread = [r['fid'] for r in rows if r['sampler'].startswith('dpm_solver_2m, seed')]
    print(f'FID of DPM-Solver++(2M) at 20 NFE over 5 seeds: mean {np.mean(spread):.3f}, '
          f'sd {np.std(spread, ddof=1):.3f}')
    return dict(workdir=args.digits, step=int(step), config=args.config, sde=config.sde.name,
                num_samples=args.digits_samples, rows=rows, baselines=baselines,
                fid_seed_spread=dict(mean=float(np.mean(spread)),
                                     sd=float(np.std(spread, ddof=1))))
  pc_best = [r for r in rows if r['sampler'] == 'pc']
  target = min(pc_best, key=lambda r: -r['nfe'])['fid']
  reach = {}
  for name in FAST:
    ok = [r['nfe'] for r in rows if r['sampler'] == name and r['fid'] <= target]
    reach[name] = min(ok) if ok else None
  print(f'PC at {max(r["nfe"] for r in pc_best)} NFE: FID {target:.3f}; smallest NFE reaching '
        f'it: {reach}')
  return dict(workdir=args.digits, step=int(step), config=args.config, sde=config.sde.name,
              num_samples=args.digits_samples, rows=rows, target_fid=target,
              smallest_nfe_reaching_target=reach, baselines=baselines)


def plot(result, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  panels = []
  if 'mixture' in result:
    for sde in sorted({r['sde'] for r in result['mixture']['rows']}):
      panels.append((f'2-D mixture, {sde} (exact score)', 'energy_distance',
                     [r for r in result['mixture']['rows'] if r['sde'] == sde],
                     result['mixture']['floor'], 'floor (two true sets)'))
  if 'digits' in result:
    d = result['digits']
    panels.append((f"digits, {d['sde']} (trained model, {d['num_samples']} samples)", 'fid',
                   d['rows'], d['baselines'].get('held_out_real', {}).get('fid'),
                   'held-out real digits'))
  colors = {label: f'C{i}' for i, label in
            enumerate(('pc', 'pc, no corrector', 'ode (adaptive)') + FAST)}
  cols = 2
  fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(5.5 * cols, 4 * -(-len(panels) // cols)),
                           squeeze=False)
  for ax, (title, metric, rows, floor, floor_label) in zip(axes.flat, panels):
    for label in colors:
      pts = sorted((r['nfe'], r[metric]) for r in rows if r['sampler'] == label)
      if not pts:
        continue
      style = '--' if label.startswith(('pc', 'ode')) else '-'
      ax.plot(*zip(*pts), style, marker='o', ms=3, label=label, color=colors[label])
    if floor is not None:
      ax.axhline(floor, color='k', lw=0.8, ls=':', label=floor_label)
    ax.set(xscale='log', yscale='log', xlabel='score evaluations (NFE)',
           ylabel='energy distance' if metric == 'energy_distance' else 'digits-FID', title=title)
    ax.title.set_fontsize(9)
  axes.flat[0].legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'Wrote {path}')


def main(argv=None):
  args = parse_args(argv)
  result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'device': str(jax.devices()[0].device_kind), 'platform': platform.platform(),
            'jax': jax.__version__, 'args': vars(args)}
  if args.mixture_from:
    result['mixture'] = json.load(open(args.mixture_from))['mixture']
  elif not args.digits_extra:
    result['mixture'] = mixture(args)
  if args.digits:
    result['digits'] = digits(args)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'Wrote {args.out}')
  plot(result, args.plot)


if __name__ == '__main__':
  main()
