"""Evaluation and sampling of trained checkpoints: sampling rounds, bits/dim passes,
dataset statistics, baselines and the per-checkpoint report with its protocols.

Files under ``workdir``: eval/report_<step>.json (one per snapshot), eval/rounds_* (sampling
rounds of an unfinished evaluation), samples/, stats/.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import builder
import datasets
import evaluation
import likelihood
import parallel
import plotting
import train_lib


def restore_for_eval(config, comp, workdir, step=None):
  ckpts = train_lib.Checkpoints(workdir, config.training.snapshot_keep)
  # Shapes alone (restoring needs no initialised network), placed on this process's first
  # device as init_state's arrays would be.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                       jax.eval_shape(functools.partial(train_lib.init_state, config, comp)))
  try:
    if step is None:
      restored, step = ckpts.restore_newest(state)
      if restored is None:
        raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints: train first (--mode train).')
      return restored, step
    return ckpts.restore(ckpts.snapshots, step, state), step
  finally:
    ckpts.close()


def _draw_round(comp, score_fn, key, r):
  """Sampling round r: comp.sampler with the key fold_in(key, r). Returns (x, nfe)."""
  return comp.sampler(jax.random.fold_in(key, r), score_fn)


def sample_rounds(config, comp, params, key, num_samples, summarize=None, item_shape=None,
                  round_dir=None):
  """num_samples samples in rounds of sampling.batch_size, the last round trimmed.

  Round r uses the key fold_in(key, r), so the samples do not depend on how many processes
  share the rounds (process p draws the rounds r with r mod count = p), nor on resuming.

  Args:
    config, comp, params: the run's config, components and (replicated) parameters.
    key: the sampling key.
    num_samples: how many samples in all (the rounds add up to exactly this).
    summarize: ``(x [n, *data_shape], r) -> [n, *item_shape]``: what is kept of a round
      (features, say); default the samples themselves.
    item_shape: the shape of summarize's rows (default data_shape).
    round_dir: if given, each round's result is saved there (round_<r>.npz, atomically)
      and read back instead of drawn again: an evaluation killed mid-way resumes with the
      rounds it had finished.

  Returns:
    (the per-round results in order, nfe per sample of the last round).
  """
  bs = config.sampling.batch_size
  rounds = math.ceil(num_samples / bs)
  item_shape = tuple(comp.data_shape if item_shape is None else item_shape)
  score_fn = comp.score_fn(parallel.host_local(params))
  nfes = {}

  def one_round(r):
    count = min(bs, num_samples - r * bs)
    path = round_dir and os.path.join(round_dir, f'round_{r:06d}.npz')
    if path and os.path.exists(path):
      with np.load(path) as data:
        out, nfe = data['out'], int(data['nfe'])
      if out.shape == (count,) + item_shape:
        nfes[r] = nfe
        return out
    x, nfe = _draw_round(comp, score_fn, key, r)
    x = np.asarray(x)[:count]
    out = np.asarray(summarize(x, r) if summarize else x, np.float32)
    nfes[r] = int(nfe)
    if path:
      os.makedirs(round_dir, exist_ok=True)
      with open(path + '.tmp', 'wb') as f:
        np.savez(f, out=out, nfe=nfes[r])
      os.replace(path + '.tmp', path)
    return out

  out = parallel.map_over_processes(one_round, rounds, item_shape,
                                    desc=f'sampling ({builder.describe_sampler(config)})')
  nfe = parallel.map_over_processes(lambda r: np.array([nfes[r]]), rounds)[-1]
  return out, int(nfe[0])


def draw_samples(config, comp, params, key, num_samples):
  """num_samples samples in rounds of sampling.batch_size (the last round trimmed).

  Round r uses the key fold_in(key, r), so the samples do not depend on how many
  processes share the rounds. Returns (x, nfe), nfe per sample of the last round.
  """
  out, nfe = sample_rounds(config, comp, params, key, num_samples)
  return np.concatenate(out), nfe


def sample(config, workdir):
  """Writes samples/samples_<step>.npz (samples, nfe) and a PNG grid or scatter plot."""
  comp = builder.build(config)
  state, step = restore_for_eval(config, comp, workdir)
  x, nfe = draw_samples(config, comp, state.ema_params, builder.stream_key(config.seed, 'sample'),
                        config.sampling.num_samples)
  npz = os.path.join(workdir, 'samples', f'samples_{step}.npz')
  png = os.path.join(workdir, 'samples', f'samples_{step}.png')
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
    np.savez(npz, samples=x, nfe=nfe, step=step)
    plotting.save_samples(png, x, config.data.dataset, centered=config.data.centered,
                          title=_title(config, step, nfe, len(x)))
    print(f'{len(x)} samples at step {step} ({nfe} score evaluations per sample): {npz}, {png}')
  return npz, png


def _title(config, step, nfe, n):
  return plotting.sample_title(config.data.dataset, step, n, builder.describe_sampler(config), nfe)


def energy_distance(x, y):
  """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets (V-statistics)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  d = lambda a, b: jnp.mean(jnp.sqrt(jnp.sum((a[:, None] - b[None]) ** 2, -1) + 1e-12))
  return float(2 * d(x, y) - d(x, x) - d(y, y))


REPORT_KEYS = ('step', 'eval_loss', 'bpd', 'bpd_stderr', 'nfe_likelihood', 'num_samples', 'nfe_sampling',
               'sampler', 'samples_png')


TOY_REPORT_KEYS = ('test_logp_true', 'test_logp_model', 'energy_distance_model',
                   'energy_distance_true_vs_true')


# Image data with eval.enable_fid / enable_kid / enable_inception_score; 'sample_features'
# names the network ('digits' or 'inception'). With eval.enable_baselines the report also has
# 'sample_baselines' {'held_out_real', 'gaussian_fit'} -> the same metrics (and num_samples),
# and, with enable_bpd, 'bpd_baselines' {'diagonal_gaussian', 'gaussian_mixture'} ->
# {'bpd', 'bpd_stderr'}.
SAMPLE_REPORT_KEYS = ('sample_features', 'fid', 'kid', 'kid_std', 'inception_score')


def sample_metric_names(config):
  ec = config.eval
  names = [name for name, on in (('fid', ec.enable_fid), ('kid', ec.enable_kid),
                                 ('inception_score', ec.enable_inception_score)) if on]
  return names if builder.is_image_data(config) and ec.enable_sampling else []


def feature_evaluator(config):
  """The feature network of a dataset: the digits classifier for 'digits', else the FID
  Inception network (weights from eval.inception_weights or $SCORE_SDE_INCEPTION_WEIGHTS)."""
  if config.data.dataset == 'digits':
    return evaluation.DigitsEvaluator()
  return evaluation.InceptionEvaluator(config.eval.inception_weights or None)


def _feature_name(config):
  return 'digits' if config.data.dataset == 'digits' else 'inception'


def stats_path(config, workdir):
  """eval.stats_path, or <workdir>/stats/<dataset>_<split>_<n>_<size>px_<features>.npz."""
  if config.eval.stats_path:
    return config.eval.stats_path
  ec = config.eval
  size = config.data.image_size or 'native'
  name = (f'{config.data.dataset.replace("/", "_")}_{ec.stats_split}_'
          f'{ec.stats_num_examples or "all"}_{size}px_{_feature_name(config)}.npz')
  return os.path.join(workdir, 'stats', name)


def _images_uint8(config, data, n):
  """The first n images of an ordered evaluation Dataset as uint8 batches (none dropped)."""
  inverse = datasets.inverse_scaler(config.data.centered)
  for i in range(math.ceil(n / data.batch_size)):
    x = builder.batch_x(data.batch(i))[:n - i * data.batch_size]
    yield evaluation.quantize_images(inverse(x))


def compute_stats(config, workdir, evaluator=None):
  """--mode stats: the reference features of the configured dataset, saved as .npz.

  The first eval.stats_num_examples images (0: all) of eval.stats_split, in stored order,
  without augmentation or dequantization, quantized to uint8 like the samples, through the
  feature network (`feature_evaluator`); no last batch is dropped. The file (see
  `evaluation.save_reference`) holds mu, sigma (FID), eval.stats_kid_features feature rows
  (KID), the real data's Inception Score and what it was computed from; it is written
  atomically, and an existing file is kept.

  Returns:
    (path, reference).
  """
  path = stats_path(config, workdir)
  if os.path.exists(path):
    print(f'Dataset statistics exist: {path}', file=sys.stderr)
    return path, evaluation.load_reference(path)[0]
  ec = config.eval
  data = builder.dataset(config, ec.stats_split, ec.batch_size, False)
  n = ec.stats_num_examples or data.num_examples
  if n > data.num_examples:
    raise ValueError(f'eval.stats_num_examples={ec.stats_num_examples} but the {ec.stats_split!r} '
                     f'split of {config.data.dataset} has {data.num_examples} images')
  evaluator = evaluator or feature_evaluator(config)
  reference, logits = evaluation.compute_reference(
      evaluator, _images_uint8(config, data, n), ec.stats_kid_features, n,
      seed=builder.stream_seed(config.seed, 'stats_kid_rows'))
  is_mean, is_std = evaluation.inception_score(logits, min(ec.is_splits, n))   # real images
  if jax.process_index() == 0:
    evaluation.save_reference(path, reference, dataset=config.data.dataset, split=ec.stats_split,
                              image_size=int(data.data_shape[0]), features=evaluator.name,
                              inception_score=is_mean, inception_score_std=is_std)
    print(f'Statistics of {n} {config.data.dataset} images ({ec.stats_split}, '
          f'{evaluator.name} features): {path}', file=sys.stderr)
  return path, reference


def load_stats(config, workdir, evaluator, data_shape):
  """The reference statistics for FID/KID; digits compute theirs when missing (a second)."""
  path = stats_path(config, workdir)
  if not os.path.exists(path):
    if evaluator.name == 'digits':
      return compute_stats(config, workdir, evaluator)[1]
    raise FileNotFoundError(
        f'No dataset statistics at {path} (eval.stats_path) for FID/KID: compute them once with '
        f'`python main.py --config <this config> --workdir {workdir} --mode stats`, or set '
        f'eval.stats_path to an existing file, or turn off eval.enable_fid and eval.enable_kid.')
  reference, meta = evaluation.load_reference(path)
  if meta.get('features') != evaluator.name:
    raise ValueError(f'{path} holds {meta.get("features")!r} features, not {evaluator.name!r}')
  if meta.get('image_size') != data_shape[0]:
    raise ValueError(f'{path} was computed at image_size={meta.get("image_size")}, but the '
                     f'data here is {data_shape[0]} px (data.image_size)')
  return reference


class EvalContext(NamedTuple):
  """What every checkpoint's evaluation shares: computed once per `evaluate` call."""
  evaluator: Any = None
  reference: Any = None
  sample_baselines: dict | None = None
  bpd_baselines: dict | None = None
  sample_protocol: dict | None = None   # `sample_protocol`, its statistics file hashed once


def all_images(config, split):
  """Every image of a split, ordered, scaled as the model sees it (no dequantization)."""
  data = builder.dataset(config, split, config.eval.batch_size, False)
  return np.concatenate([builder.batch_x(data.batch(i)) for i in range(data.steps_per_epoch)])


def eval_context(config, comp, workdir):
  """Loads the feature network and dataset statistics and computes the baselines."""
  names = sample_metric_names(config)
  ec = config.eval
  context = EvalContext()
  if names:
    evaluator = feature_evaluator(config)
    reference = load_stats(config, workdir, evaluator, comp.data_shape)
    context = context._replace(
        evaluator=evaluator, reference=reference,
        sample_protocol=sample_protocol(config, workdir, evaluator, comp.data_shape[0]))
  if not (ec.enable_baselines and builder.is_image_data(config)):
    return context
  train = all_images(config, 'train')
  inverse = datasets.inverse_scaler(config.data.centered)
  if names:
    # Floor: held-out real images; ceiling: a Gaussian fit to the training images. Both as
    # many as the model's samples (the floor at most the whole eval split).
    n = config.sampling.num_samples
    held_out = inverse(all_images(config, ec.split)[:n])
    mean, cov = evaluation.fit_gaussian(inverse(train))
    fake = evaluation.sample_gaussian(builder.stream_key(config.seed, 'gaussian_ceiling'), mean, cov, n,
                                      comp.data_shape)
    metrics = functools.partial(evaluation.sample_metrics, reference=context.reference,
                                metrics=names, kid_subsets=ec.kid_subsets,
                                kid_subset_size=ec.kid_subset_size,
                                is_splits=ec.is_splits,
                                seed=builder.stream_seed(config.seed, 'kid_subsets'))
    context = context._replace(sample_baselines={
        'held_out_real': metrics(*context.evaluator(held_out)),
        'gaussian_fit': metrics(*context.evaluator(evaluation.quantize_samples(fake)))})
  if ec.enable_bpd and config.data.num_bits:
    fit_data = _dequantize_eval(builder.stream_key(config.seed, 'baseline_dequantization'), train, config.data.centered,
                                config.data.num_bits)
    fits = evaluation.fit_density_baselines(np.asarray(fit_data), ec.gmm_components,
                                            seed=builder.stream_seed(config.seed, 'baseline_fit'))
    d = math.prod(comp.data_shape)

    def one_batch(k, x):
      return np.stack([evaluation.bits_per_dim(fit(np.asarray(x)), d, config.data.num_bits or 8,
                                               comp.scaler_slope) for fit in fits.values()], -1)

    results = np.concatenate(_bpd_passes(config, comp, one_batch, len(fits),
                                         desc='bits/dim of the baselines'))
    context = context._replace(bpd_baselines={
        name: {'bpd': float(results[:, j].mean()),
               'bpd_stderr': float(results[:, j].std() / np.sqrt(len(results)))}
        for j, name in enumerate(fits)})
  return context


def evaluate(config, workdir):
  """Evaluates every snapshot (begin_ckpt..end_ckpt) once; a report JSON per checkpoint.

  Returns the reports written by this call; those an earlier call wrote are kept and named.

  Reports already written are skipped, and within a checkpoint the sampling rounds already
  done (eval/rounds_<step>_<signature>/) are read back, so a preempted evaluation resumes
  where it stopped and gives the numbers of an uninterrupted one.
  """
  comp = builder.build(config)
  ckpts = train_lib.Checkpoints(workdir, config.training.snapshot_keep)
  steps = sorted(ckpts.snapshots.all_steps())
  ckpts.close()
  ec = config.eval
  where = os.path.join(workdir, 'checkpoints', 'snapshots')
  if not steps:
    raise FileNotFoundError(f'No snapshot to evaluate in {where} (train first: --mode train).')
  chosen = [s for s in steps if s >= ec.begin_ckpt and (ec.end_ckpt <= 0 or s <= ec.end_ckpt)]
  if not chosen:
    end = ec.end_ckpt if ec.end_ckpt > 0 else 'the last'
    raise FileNotFoundError(
        f'No snapshot between eval.begin_ckpt={ec.begin_ckpt} and eval.end_ckpt={end} in '
        f'{where}; it holds steps {steps}.')
  steps = chosen
  eval_dir = os.path.join(workdir, 'eval')
  os.makedirs(eval_dir, exist_ok=True)
  written, kept = [], []
  context = None
  for step in steps:
    path = os.path.join(eval_dir, f'report_{step}.json')
    if os.path.exists(path):
      kept.append(path)
      if jax.process_index() == 0:
        print(f'Kept {path}, written by an earlier eval (delete it to evaluate step {step} '
              'again).', file=sys.stderr)
      continue
    try:
      state, _ = restore_for_eval(config, comp, workdir, step)
    except train_lib.DamagedCheckpointError as e:
      print(f'{e}. Skipping its evaluation.', file=sys.stderr)
      continue
    context = context or eval_context(config, comp, workdir)
    report = evaluate_checkpoint(config, comp, state, step, workdir, context)
    if jax.process_index() == 0:
      tmp = path + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
      os.replace(tmp, path)   # atomic: a report exists whole or not at all
      rounds = rounds_dir(config, workdir, step)
      if os.path.isdir(rounds):
        shutil.rmtree(rounds)   # the report holds what they were kept for
      print(_report_summary(report), file=sys.stderr)
    written.append(path)
  if not written and not kept:
    raise train_lib.DamagedCheckpointError(
        f'No snapshot between eval.begin_ckpt and eval.end_ckpt in {where} restores (each one '
        'is named above).')
  return written


# The summary warns when the samples' energy distance to the true distribution is this many
# times that between two true sample sets: a diverged sampler gives ~10^4-10^5; the default
# run about 8, the 40-step smoke config (configs/toy/test.py) about 20.
FAR_FROM_DATA = 100


def _report_summary(report):
  """A few lines comparing the model with its baselines."""
  lines = [f'step {report["step"]}:']
  keys = ('fid', 'kid', 'inception_score')
  rows = [('model', report)] + list((report.get('sample_baselines') or {}).items())
  for name, row in rows:
    values = [f'{k} {row[k]:.4g}' for k in keys if k in row]
    if values:
      lines.append(f'  {name:14s} n={row.get("num_samples")} ' + ', '.join(values))
  if 'bpd' in report:
    lines.append(f'  bpd model {report["bpd"]:.4f} +- {report["bpd_stderr"]:.4f}' + ''.join(
        f'; {name} {b["bpd"]:.4f} +- {b["bpd_stderr"]:.4f}'
        for name, b in (report.get('bpd_baselines') or {}).items()))
  if 'test_logp_true' in report and 'test_logp_model' in report:
    lines.append(f'  test log-likelihood (nats per point): model {report["test_logp_model"]:.4f}, '
                 f'true density {report["test_logp_true"]:.4f}')
  if 'energy_distance_model' in report:
    model, floor = report['energy_distance_model'], report['energy_distance_true_vs_true']
    lines.append(f'  energy distance to true samples: model {model:.4g}, two true sets {floor:.4g} '
                 f'(n={report.get("num_samples")}, {report.get("nfe_sampling")} score evaluations '
                 'per sample)')
    if model > FAR_FROM_DATA * floor:
      lines.append(f'  warning: the samples are far from the data (over {FAR_FROM_DATA} times the '
                   'distance between two true sets): the model is undertrained, or the sampler '
                   'diverged')
  return '\n'.join(lines)


def _eval_batch_count(comp, max_examples):
  n = comp.eval_data.num_examples
  if max_examples:
    n = min(n, max_examples)
  return n, math.ceil(n / comp.eval_data.batch_size)


def _eval_batch(comp, max_examples, i):
  """Batch i of the (possibly truncated) test split; the last one may be short."""
  n, _ = _eval_batch_count(comp, max_examples)
  return builder.batch_x(comp.eval_data.batch(i))[: n - i * comp.eval_data.batch_size]


def _bpd_passes(config, comp, fn, width, desc='bits/dim'):
  """fn(key, x) -> [b, width] over eval.bpd_num_repeats passes of the test batches.

  Pass r, batch i uses key = fold_in(fold_in(stream 'eval_bpd', r), i), and x is
  ``bpd_input(config, key, batch)``: quantized data dequantized afresh with this key, so the
  model and the baselines see the same noise. The work is shared among processes; returns
  the per-batch results in order.
  """
  ec = config.eval
  key = builder.stream_key(config.seed, 'eval_bpd')
  _, num_batches = _eval_batch_count(comp, ec.bpd_max_examples)

  def one_batch(j):
    r, i = divmod(j, num_batches)     # pass r over the test split, batch i
    k = jax.random.fold_in(jax.random.fold_in(key, r), i)
    return fn(k, bpd_input(config, k, _eval_batch(comp, ec.bpd_max_examples, i)))

  return parallel.map_over_processes(one_batch, max(ec.bpd_num_repeats, 1) * num_batches, (width,),
                                     desc=desc)


def bpd_protocol(config, comp) -> dict:
  """How the report's bits/dim were computed, so that they compare with the paper's."""
  ec, num_bits = config.eval, config.data.num_bits
  n, _ = _eval_batch_count(comp, ec.bpd_max_examples)
  return {
      'split': ec.split, 'num_examples': n, 'passes': max(ec.bpd_num_repeats, 1),
      'dequantization': (f'uniform: (k + u) / 2^{num_bits}, u ~ U[0, 1), fresh each pass'
                         if num_bits else 'none (continuous data)'),
      'offset_bits': likelihood.bits_per_dim_offset(num_bits or None, comp.scaler_slope),
      'data_range': '[-1, 1]' if config.data.centered else '[0, 1]',
      'ode': f'probability flow from t = {config.training.eps:g} to T, dopri5 (diffrax), '
             f'rtol {ec.rtol:g}, atol {ec.atol:g}',
      'divergence': ec.hutchinson_type if ec.hutchinson_type == 'exact'
                    else f'Hutchinson-Skilling, one {ec.hutchinson_type} probe per solve',
      'parameters': 'EMA'}


# The feature networks of the reference's FID/IS (REFERENCE.md section 12) and how ours
# relates to them, by image size.
_COMPARABILITY_SMALL = (
    'pytorch-fid port of the Inception the reference used at 32 and 64 px (tf-gan, 2015 '
    'weights), with a torch-style resize: pytorch-fid reports FIDs that differ slightly '
    'from the TF implementation (about 0.08 absolute in its example).')


_COMPARABILITY_LARGE = (
    'NOT comparable with the reference: at 256 px and above it used TF-Hub\'s ImageNet '
    'inception_v3 feature vector (another network) on [0, 1] inputs, and reported no IS.')


def sample_protocol(config, workdir, evaluator, image_size: int) -> dict:
  """How the report's FID/KID/IS were computed: network and weight hash, resize,
  quantization, sample count, reference statistics and their hash, and how the numbers
  relate to the paper's."""
  ec = config.eval
  path = stats_path(config, workdir)
  out = dict(evaluator.protocol())
  out.update(
      quantization=f'{evaluation.SAMPLE_QUANTIZATION}: clip(255 x, 0, 255) cast to uint8 '
                   '(the reference\'s rule); real images round(255 x)',
      num_samples=config.sampling.num_samples,
      reference_statistics=os.path.abspath(path),
      reference_statistics_sha256=evaluation.file_sha256(path),
      inception_score_splits=ec.is_splits,
      kid=f'unbiased MMD^2, cubic kernel, {ec.kid_subsets} subsets of {ec.kid_subset_size}')
  if evaluator.name == 'inception':
    out['comparable_with_paper'] = (_COMPARABILITY_LARGE if image_size >= 256
                                    else _COMPARABILITY_SMALL)
  else:
    out['comparable_with_paper'] = 'no: the digits classifier is this codebase\'s own network'
  return out


def bpd_input(config, key, x):
  """What the likelihood sees of a test batch x: quantized data (data.num_bits > 0, every
  image dataset) uniformly dequantized with ``key``, whatever data.uniform_dequantization
  says about training, as the reference's bits/dim; continuous data as they are. Without
  dequantization a density on the 2^b-level grid is unbounded and bits/dim meaningless."""
  if config.data.num_bits:
    return _dequantize_eval(key, jnp.asarray(x), config.data.centered, config.data.num_bits)
  return jnp.asarray(x)


def rounds_dir(config, workdir, step):
  """eval/rounds_<step>_<signature>: the signature hashes what the rounds depend on."""
  what = {'sampling': config.sampling.to_dict(), 'seed': config.seed,
          'features': _feature_name(config) if sample_metric_names(config) else None}
  signature = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join(workdir, 'eval', f'rounds_{step}_{signature[:10]}')


def evaluate_checkpoint(config, comp, state, step, workdir, context=None):
  """The report of one checkpoint: one part per metric family that eval.enable_* turns on.

  The work is shared among processes; every batch and sampling round has its own key, so
  the numbers do not depend on the process count. Sampling rounds are saved under eval/ as
  they finish and reused on a rerun.
  """
  ec = config.eval
  context = context or eval_context(config, comp, workdir)
  params = parallel.host_local(state.ema_params)
  report = {'step': int(step)}
  if ec.enable_loss:
    report.update(loss_report(config, comp, params))
  if ec.enable_bpd:
    report.update(bpd_report(config, comp, params, context))
  if ec.enable_sampling:
    report.update(sample_report(config, comp, params, step, workdir, context))
  return report


def loss_report(config, comp, params) -> dict:
  """{'eval_loss'}: the training objective on the test batches, network in eval mode."""
  key = builder.stream_key(config.seed, 'eval_loss')
  max_examples = config.eval.bpd_max_examples
  _, num_batches = _eval_batch_count(comp, max_examples)
  loss_fn = jax.jit(comp.eval_loss_fn)
  values = parallel.map_over_processes(
      lambda i: np.array([loss_fn(params, jax.random.fold_in(key, i),
                                  {'x': _eval_batch(comp, max_examples, i)})]),
      num_batches, desc='eval loss')
  return {'eval_loss': float(np.mean(np.concatenate(values)))}


def bpd_report(config, comp, params, context) -> dict:
  """bits/dim (mean, standard error), NFE, mean test log p, the protocol and baselines."""
  ec = config.eval
  lik = likelihood.get_likelihood_fn(comp.sde, hutchinson_type=ec.hutchinson_type, rtol=ec.rtol,
                                     atol=ec.atol, eps=config.training.eps,
                                     num_bits=config.data.num_bits or None,
                                     scaler_slope=comp.scaler_slope)
  score_fn = comp.score_fn(params)

  def one_batch(k, x):
    res = lik(k, score_fn, x)
    # Columns: bpd, log p, and the solve's NFE (shared by the batch).
    return np.stack([np.asarray(res.bpd), np.asarray(res.logp),
                     np.full(len(x), int(res.nfe))], axis=-1)

  results = _bpd_passes(config, comp, one_batch, 3)
  bpd = np.concatenate([r[:, 0] for r in results])
  report = {'bpd': float(bpd.mean()), 'bpd_stderr': float(bpd.std() / np.sqrt(len(bpd))),
            'nfe_likelihood': float(np.mean([r[0, 2] for r in results])),
            'test_logp_model': float(np.concatenate([r[:, 1] for r in results]).mean()),
            'bpd_protocol': bpd_protocol(config, comp)}
  if context.bpd_baselines:
    report['bpd_baselines'] = context.bpd_baselines
  return report


def sample_report(config, comp, params, step, workdir, context) -> dict:
  """Samples (picture, NFE) and what they are measured by: FID/KID/IS for image data with
  sample metrics, the energy distance and true test log p for toy data."""
  png = os.path.join(workdir, 'eval', f'samples_{step}.png')
  key = builder.stream_key(config.seed, 'eval_samples')
  round_dir = rounds_dir(config, workdir, step)
  if sample_metric_names(config):
    return _feature_sample_report(config, comp, params, step, key, png, round_dir, workdir,
                                  context)
  out, nfe = sample_rounds(config, comp, params, key, config.sampling.num_samples,
                           round_dir=round_dir)
  x = np.concatenate(out)
  if jax.process_index() == 0:
    plotting.save_samples(png, x, config.data.dataset, centered=config.data.centered,
                          title=_title(config, step, nfe, len(x)))
  report = dict(num_samples=len(x), nfe_sampling=nfe, sampler=builder.describe_sampler(config),
                samples_png=os.path.abspath(png))
  if x.ndim == 2:
    report.update(toy_report(config, comp, x))
  return report


def _feature_sample_report(config, comp, params, step, key, png, round_dir, workdir, context):
  """FID/KID/IS of the samples, from features kept round by round, with the protocol."""
  ec, ev = config.eval, context.evaluator
  inverse = datasets.inverse_scaler(config.data.centered)

  def summarize(x, r):
    if r == 0:
      plotting.save_samples(png, x, config.data.dataset, centered=config.data.centered,
                            title=_title(config, step, None, min(len(x), 256)))
    features, logits = ev(evaluation.quantize_samples(inverse(x)))
    return np.concatenate([features, logits], axis=-1)

  out, nfe = sample_rounds(config, comp, params, key, config.sampling.num_samples, summarize,
                           (ev.feature_dim + ev.num_classes,), round_dir)
  out = np.concatenate(out)
  report = evaluation.sample_metrics(
      out[:, :ev.feature_dim], out[:, ev.feature_dim:], context.reference,
      metrics=sample_metric_names(config), kid_subsets=ec.kid_subsets,
      kid_subset_size=ec.kid_subset_size, is_splits=ec.is_splits,
      seed=builder.stream_seed(config.seed, 'kid_subsets'))
  report.update(sample_features=ev.name,
                sample_protocol=context.sample_protocol,
                num_samples=len(out), nfe_sampling=nfe, sampler=builder.describe_sampler(config),
                samples_png=os.path.abspath(png))
  if context.sample_baselines:
    report['sample_baselines'] = context.sample_baselines
  return report


def toy_report(config, comp, x) -> dict:
  """Energy distance of samples x [n, 2] to true samples, beside that of two true sets (the
  floor), and the true density's mean log p on the test batches (the ceiling)."""
  n = len(x)
  true_a = datasets.toy_sample(config.data.dataset, n,
                               seed=builder.stream_seed(config.seed, 'toy_truth'))
  true_b = datasets.toy_sample(config.data.dataset, n,
                               seed=builder.stream_seed(config.seed, 'toy_truth_second'))
  report = {'energy_distance_model': energy_distance(x, true_a),
            'energy_distance_true_vs_true': energy_distance(true_b, true_a)}
  log_prob = datasets.toy_log_prob(config.data.dataset)
  if log_prob is not None:
    max_examples = config.eval.bpd_max_examples
    _, num_batches = _eval_batch_count(comp, max_examples)
    test = np.concatenate([_eval_batch(comp, max_examples, i) for i in range(num_batches)])
    report['test_logp_true'] = float(np.mean(log_prob(test)))
  return report


@functools.partial(jax.jit, static_argnames=('centered', 'num_bits'))
def _dequantize_eval(key, x, centered, num_bits=8):
  """Test images in [0, 1] (or [-1, 1]) back to integers k = round((2^b - 1) y), then
  uniformly dequantized to (k + u) / 2^b, u ~ U[0, 1) (likelihood.uniform_dequantize), and
  scaled back: the training data's dequantization, so bits/dim carry the offset
  b - log2(slope) of likelihood.py. Digits are stored on this 8-bit grid (17 grey levels
  at round(255 v / 16)), so they are dequantized as 8-bit images too."""
  y = (x + 1) / 2 if centered else x
  ints = jnp.round(jnp.asarray(y) * (2 ** num_bits - 1))
  y = likelihood.uniform_dequantize(key, ints, num_bits)
  return 2 * y - 1 if centered else y

