"""The noise-conditional classifier of class guidance: training, accuracy per noise level,
loading, and class-conditional sampling (``--mode train_classifier``, ``--mode conditional``).

The classifier learns p_t(y | x_t) on training images perturbed by the run's SDE,
x_t = a(t) x_0 + std(t) z with t ~ U(eps, T), by cross-entropy. Its checkpoint
(<workdir>/classifier/checkpoint.msgpack: step, parameters, optimizer state) is written
atomically every ``classifier.checkpoint_freq`` steps; a restarted run resumes from it with
the same batches and keys, so it ends with the parameters of an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import sys
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import builder
import controllable_generation
import datasets
import eval_lib
import evaluation
import plotting
from models import classifier as classifier_models
from sde_lib import batch_broadcast


def make_classifier(config, num_classes: int = 10):
  c = config.classifier
  if c.model == 'cnn':
    return classifier_models.get_classifier('cnn', num_classes=num_classes, nf=c.nf)
  return classifier_models.get_classifier(c.model, num_classes=num_classes, depth=c.depth,
                                          widen=c.widen, dropout=c.dropout)


def _dir(workdir):
  return os.path.join(workdir, 'classifier')


def _checkpoint_path(workdir):
  return os.path.join(_dir(workdir), 'checkpoint.msgpack')


def _init(config, model, data_shape):
  params = jax.jit(model.init)(builder.stream_key(config.seed, 'classifier_init'),
                               jnp.zeros((1,) + tuple(data_shape)), jnp.zeros((1,)))
  optimizer = optax.adam(config.classifier.lr)
  return {'step': 0, 'params': params, 'opt_state': optimizer.init(params)}, optimizer


def _save(workdir, state):
  path = _checkpoint_path(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'wb') as f:
    f.write(flax.serialization.to_bytes(jax.device_get(state)))
  os.replace(path + '.tmp', path)   # atomic: the file is whole or the previous one


def _restore(workdir, template):
  path = _checkpoint_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return flax.serialization.from_bytes(template, data)
  except Exception as e:   # truncated or foreign file: never trusted
    raise ValueError(f'The classifier checkpoint {path} is damaged or does not match '
                     f'config.classifier ({type(e).__name__}: {e}); remove it to retrain.') from e


def _perturb(sde, key, x, eps):
  k_t, k_z = jax.random.split(key)
  t = jax.random.uniform(k_t, x.shape[:1], minval=eps, maxval=sde.T)
  a, std = sde.marginal_coeffs(t)
  z = jax.random.normal(k_z, x.shape)
  return batch_broadcast(a, x) * x + batch_broadcast(std, x) * z, t


def _labels(batch, config):
  if 'label' not in batch:
    raise ValueError(f'data.dataset={config.data.dataset!r} has no labels: a classifier needs them')
  return jnp.asarray(batch['label'])


def train_classifier(config, workdir):
  """Trains (or resumes) the classifier, then writes classifier/report.json. Returns its path."""
  comp = builder.build(config)
  model = make_classifier(config)
  state, optimizer = _init(config, model, comp.data_shape)
  restored = _restore(workdir, state)
  if restored is not None:
    state = restored
    print(f'Resuming the classifier from step {state["step"]}', file=sys.stderr)
  c = config.classifier
  train_key = builder.stream_key(config.seed, 'classifier_train')

  @jax.jit
  def step(params, opt_state, step, x, labels):
    x_t, t = _perturb(comp.sde, jax.random.fold_in(train_key, step), x, c.eps)

    def loss_fn(params):
      logp = classifier_models.log_prob(model, comp.sde, params, comp.data_std, x_t, t)
      return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  data = builder.dataset(config, 'train', c.batch_size, True, whole=True)
  params, opt_state, start = state['params'], state['opt_state'], int(state['step'])
  t0 = time.time()
  for i in range(start, c.n_iters):
    batch = data.batch(i)
    params, opt_state, loss = step(params, opt_state, i, jnp.asarray(builder.batch_x(batch)),
                                   _labels(batch, config))
    done = i + 1
    if done % c.checkpoint_freq == 0 or done == c.n_iters:
      if not np.isfinite(float(loss)):
        raise FloatingPointError(f'Classifier loss became {float(loss)} at step {done}; the last '
                                 f'good checkpoint is kept in {_dir(workdir)}.')
      _save(workdir, {'step': done, 'params': params, 'opt_state': opt_state})
      print(f'classifier step {done}/{c.n_iters} loss {float(loss):.4f} '
            f'({time.time() - t0:.0f} s)', file=sys.stderr)
  report = accuracy_report(config, comp, model, params)
  path = os.path.join(_dir(workdir), 'report.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(path + '.tmp', path)
  print('classifier accuracy by t: ' + ', '.join(
      f'{t:g}: {a:.3f}' for t, a in zip(report['eval_times'], report['accuracy'])), file=sys.stderr)
  return path


def accuracy_report(config, comp, model, params) -> dict:
  """Accuracy on the whole eval split perturbed to each of classifier.eval_times (one noise
  draw per image and time, from the classifier_eval stream)."""
  log_prob = jax.jit(classifier_models.classifier_log_prob(model, comp.sde, params, comp.data_std))
  key = builder.stream_key(config.seed, 'classifier_eval')
  times = [float(t) for t in config.classifier.eval_times]
  correct, total = np.zeros(len(times)), 0
  for b, batch in enumerate(comp.eval_data):
    x, labels = jnp.asarray(builder.batch_x(batch)), np.asarray(_labels(batch, config))
    for j, t in enumerate(times):
      tt = jnp.full(x.shape[:1], t)
      a, std = comp.sde.marginal_coeffs(tt)
      z = jax.random.normal(jax.random.fold_in(key, b * len(times) + j), x.shape)
      x_t = batch_broadcast(a, x) * x + batch_broadcast(std, x) * z
      correct[j] += np.sum(np.argmax(np.asarray(log_prob(x_t, tt)), -1) == labels)
    total += len(labels)
  return {'eval_times': times, 'accuracy': list(correct / total), 'num_examples': total,
          'sde': config.sde.name, 'classifier': config.classifier.model}


def load_classifier(config, comp, workdir):
  """``log_prob_fn(x_t, t)`` of the trained classifier in ``workdir``."""
  model = make_classifier(config)
  template, _ = _init(config, model, comp.data_shape)
  state = _restore(workdir, template)
  if state is None:
    raise FileNotFoundError(f'No classifier in {_dir(workdir)}: run --mode train_classifier first.')
  if int(state['step']) < config.classifier.n_iters:
    print(f'Warning: the classifier has {state["step"]} of {config.classifier.n_iters} steps',
          file=sys.stderr)
  return classifier_models.classifier_log_prob(model, comp.sde, state['params'], comp.data_std)


def conditional(config, workdir):
  """Class-conditional samples by classifier guidance: a grid (one row per class) and a report
  with the share of samples that the embedded digits classifier (digits) assigns to their
  target class. Returns the report's path."""
  comp = builder.build(config)
  state, step = eval_lib.restore_for_eval(config, comp, workdir)
  log_prob_fn = load_classifier(config, comp, workdir)
  num_classes, per_class = 10, config.conditional.samples_per_class
  labels = jnp.repeat(jnp.arange(num_classes), per_class)
  score_fn = controllable_generation.classifier_guided_score(
      comp.score_fn(state.ema_params), log_prob_fn, labels, config.conditional.scale)
  sampler = builder.make_sampler(config, comp.sde, (len(labels),) + comp.data_shape)
  t0 = time.time()
  x, nfe = sampler(builder.stream_key(config.seed, 'conditional_samples'), score_fn)
  x = np.asarray(x)
  wall = time.time() - t0
  out_dir = os.path.join(workdir, 'conditional')
  os.makedirs(out_dir, exist_ok=True)
  png = os.path.join(out_dir, f'samples_{step}_scale_{config.conditional.scale:g}.png')
  plotting.save_samples(png, x, config.data.dataset, centered=config.data.centered,
                        cols=per_class)
  report = {'step': int(step), 'scale': float(config.conditional.scale), 'nfe': int(nfe),
            'wall_seconds': wall, 'num_samples': len(x), 'all_finite': bool(np.all(np.isfinite(x))),
            'samples_png': os.path.abspath(png)}
  if config.data.dataset == 'digits':
    images = evaluation.quantize_samples(
        np.asarray(datasets.inverse_scaler(config.data.centered)(x)))
    predicted = np.argmax(evaluation.DigitsEvaluator()(images)[1], -1)
    hits = predicted == np.asarray(labels)
    report['target_accuracy'] = float(hits.mean())
    report['target_accuracy_per_class'] = [float(hits[labels == k].mean()) for k in range(num_classes)]
  path = os.path.join(out_dir, f'report_{step}_scale_{config.conditional.scale:g}.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(path + '.tmp', path)
  return path
