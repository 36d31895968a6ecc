"""Inverse problems from the entry point (``--mode inverse``).

The first ``inverse.num_examples`` test images are measured, y = A x + noise_std z, with the
operator of ``inverse.task``; a trained (or imported) score model samples the posterior with
``inverse.method`` (controllable_generation.py), ``inverse.samples_per_example`` samples
each. The report gives PSNR and SSIM against the ground truth (per sample and of the
posterior mean), the data consistency ||A x - y|| beside noise_std, NFE and wall time, and
the same fidelity for three baselines that know no score: the pseudo-inverse A^+ y, the
training mean made consistent (mean + A^+ (y - A mean)), and the training image whose
measurement is nearest to y.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import builder
import controllable_generation as cg
import datasets
import eval_lib
import evaluation
import plotting

TASKS = ('inpainting', 'colorization', 'super_resolution', 'compressed_sensing', 'mri', 'ct')


def make_operator(inv, data_shape, key):
  """The operator of task ``inv.task`` (the config's ``inverse`` section) for images of shape
  ``data_shape`` [H, W, C]."""
  h, w, c = data_shape
  task = inv.task
  if task == 'inpainting':
    if inv.mask == 'half':
      mask = np.zeros(data_shape, bool)
      mask[:, : w // 2] = True
    elif inv.mask == 'random':
      pixels = np.asarray(jax.random.uniform(key, (h, w, 1))) < inv.mask_fraction
      mask = np.broadcast_to(pixels, data_shape)
    else:
      raise ValueError(f"inverse.mask must be 'half' or 'random', got {inv.mask!r}")
    return cg.Inpainting(mask)
  if task == 'colorization':
    if c != 3:
      raise ValueError(f'colorization needs colour images (data.num_channels=3), got {c} channel(s)')
    return cg.Colorization(data_shape)
  if task == 'super_resolution':
    return cg.SuperResolution(inv.factor, data_shape)
  if task == 'compressed_sensing':
    return cg.compressed_sensing(key, max(1, int(round(inv.measurement_ratio * h * w * c))),
                                 data_shape)
  if task == 'mri':
    if h != w:
      raise ValueError(f'mri needs square images, got data shape {tuple(data_shape)}')
    return cg.FourierSubsampling(cg.fourier_mask(key, w, inv.acceleration, inv.center_lines),
                                 num_channels=c)
  if task == 'ct':
    return cg.RadonTransform(inv.num_angles, data_shape)
  raise ValueError(f'Unknown inverse.task {task!r}; valid tasks: {list(TASKS)}')


def method_options(inv, data_std):
  """The posterior sampler's options of ``inv.method`` from the config's ``inverse`` section."""
  return {'imputation': {}, 'projection': {'weight': inv.weight},
          'dps': {'step_size': inv.step_size},
          'moment_matching': {'cg_iters': inv.cg_iters, 'covariance': inv.covariance,
                              'data_var': float(data_std)**2,
                              'max_time': inv.max_time or None}}.get(inv.method, {})


def _fidelity(x01, truth01, repeats):
  """PSNR / SSIM of [n * repeats] images in [0, 1] against their ground truth."""
  t = np.repeat(truth01, repeats, axis=0)
  return {'psnr': float(np.mean(evaluation.psnr(x01, t))),
          'ssim': float(np.mean(evaluation.ssim(x01, t)))}


def _consistency(op, x, y):
  """RMS over each example's measurement of A x - y, averaged over examples."""
  r = np.asarray(op.forward(jnp.asarray(x)) - y).reshape(len(x), -1)
  return float(np.mean(np.sqrt(np.mean(r**2, axis=1))))


def baselines(op, y, train, lo, hi):
  """The three score-free reconstructions of y, clipped to the data range [lo, hi]."""
  mean = jnp.asarray(train.mean(0, keepdims=True))
  ay = np.asarray(op.forward(jnp.asarray(train)))
  d = ((ay[None] - np.asarray(y)[:, None])**2).reshape(len(y), len(train), -1).sum(-1)
  out = {'pseudo_inverse': op.pinv(y),
         'mean_fill': op.project(jnp.broadcast_to(mean, (len(y),) + mean.shape[1:]), y),
         'nearest_training_image': train[np.argmin(d, axis=1)]}
  return {k: np.clip(np.asarray(v), lo, hi) for k, v in out.items()}


def inverse(config, workdir):
  """Runs ``--mode inverse``; writes inverse/<task>_<method>_<step>.{png,json}. Returns the JSON's path."""
  inv = config.inverse
  if inv.method not in cg.INVERSE_METHODS:
    raise ValueError(f'Unknown inverse.method {inv.method!r}; valid: {list(cg.INVERSE_METHODS)}')
  comp = builder.build(config)
  state, step = eval_lib.restore_for_eval(config, comp, workdir)
  n, reps = inv.num_examples, inv.samples_per_example
  test = eval_lib.all_images(config, config.eval.split)
  if n > len(test):
    raise ValueError(f'inverse.num_examples={n} but the {config.eval.split} split has {len(test)}')
  truth = jnp.asarray(test[:n])
  k_op, k_noise = jax.random.split(builder.stream_key(config.seed, 'inverse_truth'))
  op = make_operator(inv, comp.data_shape, k_op)
  y = op.measure(k_noise, truth, inv.noise_std)
  y_rep = jnp.repeat(y, reps, axis=0)
  s = config.sampling
  sampler = cg.get_inverse_sampler(
      comp.sde, op, (n * reps,) + comp.data_shape, inv.method, noise_std=inv.noise_std,
      predictor=s.predictor, corrector=None if inv.method in ('dps', 'moment_matching') else s.corrector,
      snr=s.snr, n_steps=s.n_steps_each, denoise=s.noise_removal, eps=s.eps,
      **method_options(inv, comp.data_std))
  score_fn = comp.score_fn(state.ema_params)
  t0 = time.time()
  x, nfe = sampler(builder.stream_key(config.seed, 'inverse_samples'), score_fn, y_rep)
  x = np.asarray(jax.block_until_ready(x))
  wall = time.time() - t0

  to01 = functools.partial(datasets.to_unit_range, centered=config.data.centered)
  lo, hi = (-1.0, 1.0) if config.data.centered else (0.0, 1.0)
  truth01 = to01(truth)
  samples01 = to01(x)
  mean01 = samples01.reshape((n, reps) + samples01.shape[1:]).mean(1)
  report = {'step': int(step), 'task': inv.task, 'method': inv.method, 'sde': config.sde.name,
            'noise_std': float(inv.noise_std), 'options': method_options(inv, comp.data_std),
            'num_examples': n, 'samples_per_example': reps, 'nfe': int(nfe),
            'wall_seconds': wall, 'all_finite': bool(np.all(np.isfinite(x))),
            'samples': _fidelity(samples01, truth01, reps),
            'posterior_mean': _fidelity(mean01, truth01, 1),
            'consistency_rms': _consistency(op, x, y_rep),
            'truth_consistency_rms': _consistency(op, np.asarray(truth), y)}
  base = baselines(op, y, eval_lib.all_images(config, 'train'), lo, hi)
  report['baselines'] = {k: _fidelity(to01(v), truth01, 1) for k, v in base.items()}

  out_dir = os.path.join(workdir, 'inverse')
  os.makedirs(out_dir, exist_ok=True)
  name = f'{inv.task}_{inv.method}_{step}'
  rows = [np.concatenate([truth01[i:i + 1], to01(base['pseudo_inverse'][i:i + 1]),
                          samples01[i * reps:(i + 1) * reps]]) for i in range(n)]
  png = os.path.join(out_dir, name + '.png')
  plotting.save_samples(png, np.concatenate(rows), config.data.dataset, cols=reps + 2)
  report['picture'] = os.path.abspath(png)
  report['picture_layout'] = 'each row: ground truth | A^+ y (the measurement) | posterior samples'
  path = os.path.join(out_dir, name + '.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(path + '.tmp', path)
  return path
