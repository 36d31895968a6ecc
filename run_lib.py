"""The entry point's dispatcher: ``run(config, workdir, mode)`` for every mode of main.py.

Building lives in builder.py, training in train_lib.py, evaluation and sampling in
eval_lib.py, the device mesh and multi-process helpers in parallel.py.
"""
from __future__ import annotations

import os

import jax

import builder
import eval_lib
import parallel
import train_lib
import workdir as workdir_lib


MODES = ('train', 'eval', 'sample', 'stats', 'all', 'train_classifier', 'conditional', 'inverse')


def run(config, workdir, mode, allow_config_change=False):
  """Dispatches one mode; 'all' trains, then evaluates. Returns the paths it wrote.

  'stats' computes the dataset statistics that FID/KID compare with (`compute_stats`).
  'train_classifier' trains the noise-conditional classifier of class guidance and
  'conditional' draws class-conditional samples with it (classifier_lib.py); 'inverse' samples
  posteriors of measured test images (inverse_lib.py).
  'all' first checks that the evaluation can run (feature network, statistics), so that a
  missing file fails before training rather than after it.

  The workdir belongs to the config that made it and to one run at a time (workdir.py): a
  config that differs in its model, SDE or data is refused unless ``allow_config_change``.
  """
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; valid modes: {list(MODES)}')
  builder.validate_config(config)   # before the workdir records it
  with workdir_lib.claim(config, workdir, mode, allow_config_change,
                         writer=jax.process_index() == 0, agree=parallel.all_agree):
    return _dispatch(config, workdir, mode)


def _dispatch(config, workdir, mode):
  if mode == 'train':
    train_lib.train(config, workdir)
    return []
  if mode == 'sample':
    return list(eval_lib.sample(config, workdir))
  if mode == 'eval':
    return eval_lib.evaluate(config, workdir)
  if mode == 'stats':
    existed = os.path.exists(eval_lib.stats_path(config, workdir))
    path = eval_lib.compute_stats(config, workdir)[0]
    return [] if existed else [path]
  if mode in ('train_classifier', 'conditional'):
    import classifier_lib   # the classifier's modules load only for these modes
    if mode == 'train_classifier':
      return [classifier_lib.train_classifier(config, workdir)]
    return [classifier_lib.conditional(config, workdir)]
  if mode == 'inverse':
    import inverse_lib
    return [inverse_lib.inverse(config, workdir)]
  if eval_lib.sample_metric_names(config):
    shape = builder.dataset(config, config.eval.stats_split, 1, False).data_shape
    eval_lib.load_stats(config, workdir, eval_lib.feature_evaluator(config), shape)
  train_lib.train(config, workdir)
  return eval_lib.evaluate(config, workdir)
