"""The rule each config field's value must meet, by its meaning: one row per field.

builder.validate_config checks every row at start-up (with the checks that need the
registries, such as model.name, and those that tie fields together, such as
0 < sde.sigma_min < sde.sigma_max), so that a bad value fails before anything runs, with a
message naming the field. Each row carries a value that breaks it: the tests try them all.
"""
from __future__ import annotations

import numbers


def _integer(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def integer(low):
  return lambda v: _integer(v) and v >= low


def real_above(low):
  return lambda v: _real(v) and v > low


def real_at_least(low):
  return lambda v: _real(v) and v >= low


def fraction(v):            # [0, 1)
  return _real(v) and 0 <= v < 1


def inside_unit(v):         # (0, 1)
  return _real(v) and 0 < v < 1


def one_of(*values):
  return lambda v: v in values


def integers(low, empty_ok):
  return lambda v: (isinstance(v, (tuple, list)) and (empty_ok or len(v) > 0)
                    and all(_integer(x) and x >= low for x in v))


POSITIVE_INT = ('an integer >= 1', integer(1), 0)
NON_NEGATIVE_INT = ('an integer >= 0', integer(0), -1)
POSITIVE = ('a number > 0', real_above(0), 0.0)
NON_NEGATIVE = ('a number >= 0', real_at_least(0), -1.0)
FRACTION = ('a number in [0, 1)', fraction, 1.0)
INSIDE_UNIT = ('a number in (0, 1)', inside_unit, 0.0)

# field -> (what it must be, the check, a value that breaks it)
RULES = {
    'seed': NON_NEGATIVE_INT,
    'data.image_size': ('an integer >= 0 (0: the dataset\'s own size)', integer(0), -32),
    'data.num_channels': ('1 or 3', one_of(1, 3), 2),
    'data.num_bits': ('an integer >= 0 (0: continuous data)', integer(0), -8),
    'data.memory_budget_mb': NON_NEGATIVE,
    'data.num_workers': NON_NEGATIVE_INT,
    'data.prefetch': POSITIVE_INT,
    'sde.num_scales': ('an integer >= 2', integer(2), 1),
    'model.ema_rate': FRACTION,
    'model.hidden': ('a non-empty tuple of layer widths >= 1, e.g. (128, 128)',
                     integers(1, empty_ok=False), ('abc',)),
    'model.embed_dim': POSITIVE_INT,
    'model.nf': POSITIVE_INT,
    'model.ch_mult': ('a non-empty tuple of width multipliers >= 1', integers(1, empty_ok=False),
                      ()),
    'model.num_res_blocks': POSITIVE_INT,
    'model.attn_resolutions': ('a tuple of resolutions >= 1 (may be empty)',
                               integers(1, empty_ok=True), (0,)),
    'model.dropout': FRACTION,
    'model.fourier_scale': POSITIVE,
    'model.resblock_type': ("'ddpm' or 'biggan'", one_of('ddpm', 'biggan'), 'resnet'),
    'model.progressive': ("'none', 'output_skip' or 'residual'",
                          one_of('none', 'output_skip', 'residual'), 'input_skip'),
    'model.progressive_input': ("'none', 'input_skip' or 'residual'",
                                one_of('none', 'input_skip', 'residual'), 'output_skip'),
    'model.progressive_combine': ("'sum' or 'cat'", one_of('sum', 'cat'), 'add'),
    'model.embedding_type': ("'positional', 'fourier' or 'fourier_time'",
                             one_of('positional', 'fourier', 'fourier_time'), 'sinusoidal'),
    'model.interpolation': ("'bilinear' or 'nearest_neighbor'",
                            one_of('bilinear', 'nearest_neighbor'), 'bicubic'),
    'model.dtype': ("'float32' or 'bfloat16'", one_of('float32', 'bfloat16'), 'float16'),
    'training.batch_size': POSITIVE_INT,
    'training.n_iters': POSITIVE_INT,
    'training.steps_per_call': POSITIVE_INT,
    'training.eps': INSIDE_UNIT,
    'training.log_freq': POSITIVE_INT,
    'training.snapshot_freq': POSITIVE_INT,
    'training.snapshot_keep': POSITIVE_INT,
    'training.preemption_freq': POSITIVE_INT,
    'optim.lr': POSITIVE,
    'optim.beta1': FRACTION,
    'optim.eps': POSITIVE,
    'optim.weight_decay': NON_NEGATIVE,
    'optim.warmup': NON_NEGATIVE_INT,
    'optim.grad_clip': ('a number >= 0 (0: no clipping)', real_at_least(0), -1.0),
    'sampling.steps': POSITIVE_INT,
    'sampling.eta': NON_NEGATIVE,
    'sampling.churn': NON_NEGATIVE,
    'sampling.order': ('1, 2 or 3', one_of(1, 2, 3), 4),
    'sampling.n_steps_each': POSITIVE_INT,
    'sampling.eps': INSIDE_UNIT,
    'sampling.rtol': POSITIVE,
    'sampling.atol': POSITIVE,
    'sampling.num_samples': POSITIVE_INT,
    'sampling.batch_size': POSITIVE_INT,
    'eval.batch_size': POSITIVE_INT,
    'eval.begin_ckpt': NON_NEGATIVE_INT,
    'eval.end_ckpt': ('an integer >= 0 (0: the last)', integer(0), -1),
    'eval.bpd_num_repeats': ('an integer >= 1 (passes over the test split)', integer(1), 0),
    'eval.bpd_max_examples': ('an integer >= 0 (0: the whole test split)', integer(0), -1),
    'eval.rtol': POSITIVE,
    'eval.atol': POSITIVE,
    'eval.stats_num_examples': ('an integer >= 0 (0: all)', integer(0), -1),
    'eval.stats_kid_features': POSITIVE_INT,
    'eval.kid_subsets': POSITIVE_INT,
    'eval.kid_subset_size': POSITIVE_INT,
    'eval.is_splits': POSITIVE_INT,
    'eval.gmm_components': POSITIVE_INT,
    'classifier.nf': POSITIVE_INT,
    'classifier.depth': POSITIVE_INT,
    'classifier.widen': POSITIVE_INT,
    'classifier.dropout': FRACTION,
    'classifier.n_iters': POSITIVE_INT,
    'classifier.batch_size': POSITIVE_INT,
    'classifier.lr': POSITIVE,
    'classifier.checkpoint_freq': POSITIVE_INT,
    'classifier.eps': INSIDE_UNIT,
    'conditional.scale': NON_NEGATIVE,
    'conditional.samples_per_class': POSITIVE_INT,
    'inverse.noise_std': NON_NEGATIVE,
    'inverse.weight': NON_NEGATIVE,
    'inverse.step_size': POSITIVE,
    'inverse.cg_iters': POSITIVE_INT,
    'inverse.max_time': ('a number in [0, 1] (0: no limit)', lambda v: _real(v) and 0 <= v <= 1,
                         1.5),
    'inverse.num_examples': POSITIVE_INT,
    'inverse.samples_per_example': POSITIVE_INT,
    'inverse.mask_fraction': INSIDE_UNIT,
    'inverse.factor': POSITIVE_INT,
    'inverse.measurement_ratio': ('a number in (0, 1]', lambda v: _real(v) and 0 < v <= 1, 0.0),
    'inverse.acceleration': POSITIVE_INT,
    'inverse.center_lines': NON_NEGATIVE_INT,
    'inverse.num_angles': POSITIVE_INT,
}


def violations(config) -> list[str]:
  """A line per field whose value breaks its rule (fields a config lacks are skipped)."""
  lines = []
  for field, (meaning, check, _) in RULES.items():
    node, found = config, True
    for part in field.split('.'):
      if part not in node:
        found = False
        break
      node = node[part]
    if found and not check(node):
      lines.append(f'{field} must be {meaning}, got {node!r}')
  return lines
