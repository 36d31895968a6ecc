"""builder.py: config checks and the one config-to-objects builder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import builder
from configs import rules
from run_helpers import toy_config


def test_bad_configs_fail_with_clear_messages(data_dir):
  config = toy_config(data_dir)
  with pytest.raises(AttributeError, match='batchsize'):
    config.training.batchsize = 8      # misspelled key: the config is locked
  cases = [('sde.name', 'vp', r"sde.name='vp'; valid: \['subvpsde', 'vesde', 'vpsde'\]"),
           ('optim.lr', -1e-3, r'optim.lr must be a number > 0, got -0.001'),
           ('sampling.predictor', 'heun', r"sampling.predictor='heun'; valid"),
           ('sampling.corrector', 'hmc', r"sampling.corrector='hmc'; valid"),
           ('training.loss', 'l1', r"training.loss='l1'"),
           ('training.batch_size', 0, 'training.batch_size must be an integer >= 1, got 0'),
           ('sampling.method', 'dpm', r"sampling.method='dpm'; valid: \['pc', 'ode', 'ddim'"),
           ('sampling.steps', 0, 'sampling.steps must be an integer >= 1, got 0'),
           ('sampling.grid', 'cosine', r"sampling.grid='cosine'; valid: \['', 'karras'"),
           ('sampling.eta', -1.0, 'sampling.eta must be a number >= 0'),
           ('sampling.order', 4, 'sampling.order must be 1, 2 or 3, got 4')]
  for key, value, message in cases:
    config = toy_config(data_dir, **{key: value})
    with pytest.raises(ValueError, match=message):
      builder.validate_config(config, num_devices=1)
  # Settings that used to run with a wrong meaning or fail deep inside numpy, flax or matplotlib.
  more = [({'sampling.snr': 0.0}, r"sampling.snr must be positive with corrector='langevin'"),
          ({'sampling.snr': -0.16}, 'sampling.snr must be positive'),
          ({'sde.name': 'vesde', 'sde.sigma_min': 0.0},
           r'0 < sde.sigma_min < sde.sigma_max, got sigma_min=0.0, sigma_max='),
          ({'sde.name': 'vesde', 'sde.sigma_min': 60.0, 'sde.sigma_max': 50.0},
           'got sigma_min=60.0, sigma_max=50.0'),
          ({'sde.beta_max': 0.05}, r'vpsde needs 0 <= sde.beta_min < sde.beta_max, got beta_min=0.1'),
          ({'eval.bpd_max_examples': -1}, r'eval.bpd_max_examples must be an integer >= 0 \(0: the whole'),
          ({'eval.bpd_num_repeats': 0}, 'eval.bpd_num_repeats must be an integer >= 1'),
          ({'model.hidden': ('a', 'b', 'c')},   # a tuple of strings
           r"model.hidden must be a non-empty tuple of layer widths .* got \('a', 'b', 'c'\)"),
          ({'model.hidden': (64, 0)}, 'model.hidden must be'),
          ({'data.num_workers': -1}, 'data.num_workers must be an integer >= 0, got -1'),
          ({'data.prefetch': 0}, 'data.prefetch must be an integer >= 1, got 0'),
          ({'data.memory_budget_mb': -5.0}, 'data.memory_budget_mb must be a number >= 0'),
          # VP's discrete chain with fewer steps than beta_max: NaN samples, refused at start-up.
          ({'sde.num_scales': 10},
           r'VPSDE with N=10 steps: .* needs beta_max / N <= 1, here 20 / 10; use N >= 20 '
           r'\(sde.num_scales')]
  for overrides, message in more:
    config = toy_config(data_dir, **overrides)
    with pytest.raises(ValueError, match=message):
      builder.validate_config(config, num_devices=1)
  with pytest.raises(ValueError, match=r"data.dataset='gaussian_mixtur'; valid: .*gaussian_mixture"):
    builder.validate_config(toy_config(data_dir, **{'data.dataset': 'gaussian_mixtur'}),
                            num_devices=1)
  # Without the chain (Euler-Maruyama, no corrector) the same steps are fine.
  builder.validate_config(toy_config(data_dir, **{
      'sde.num_scales': 10, 'sampling.predictor': 'euler_maruyama', 'sampling.corrector': 'none'}),
      num_devices=1)
  # A corrector-free sampler has no use for snr.
  builder.validate_config(toy_config(data_dir, **{'sampling.snr': 0.0, 'sampling.corrector': 'none'}),
                          num_devices=1)
  config = toy_config(data_dir, **{'training.batch_size': 64})
  with pytest.raises(ValueError, match='batch_size=64 is not divisible by the 3 devices'):
    builder.validate_config(config, num_devices=3)


@pytest.mark.parametrize('field', sorted(rules.RULES))
def test_each_field_rule_refuses_its_counterexample_at_start_up(data_dir, field):
  meaning, check, bad = rules.RULES[field]
  config = toy_config(data_dir)
  section, _, name = field.rpartition('.')
  node = config[section] if section else config
  assert check(node[name]), f'the default {field}={node[name]!r} breaks its own rule'
  node[name] = bad
  with pytest.raises(ValueError) as e:
    builder.validate_config(config, num_devices=1)
  assert f'{field} must be {meaning}, got {bad!r}' in str(e.value)


def test_every_shipped_config_meets_the_rules():
  import importlib
  import pathlib
  root = pathlib.Path(builder.__file__).parent
  names = [str(p.relative_to(root).with_suffix('')).replace('/', '.')
           for p in (root / 'configs').rglob('*.py')]
  checked = 0
  for name in sorted(names):
    module = importlib.import_module(name)
    if hasattr(module, 'get_config'):
      assert rules.violations(module.get_config()) == [], name
      checked += 1
  assert checked > 40


def test_image_config_without_num_bits_fails_clearly():
  from configs.vp import digits
  config = digits.get_config()
  config.data.num_bits = 0
  with pytest.raises(ValueError, match='data.num_bits=0 but digits holds quantized images'):
    builder.validate_config(config, num_devices=1)



def test_convention_mismatches_fail_clearly(data_dir):
  config = toy_config(data_dir)
  config.model.convention = 'reference'
  with pytest.raises(ValueError, match="model.name='mlp' needs model.convention='ours'"):
    builder.validate_config(config, num_devices=1)
  config.model.convention = 'theirs'
  with pytest.raises(ValueError, match="model.convention='theirs'; valid"):
    builder.validate_config(config, num_devices=1)
  from configs.ve import digits
  config = digits.get_config()
  config.model.scale_by_sigma = True
  with pytest.raises(ValueError, match='model.scale_by_sigma needs model.convention'):
    builder.validate_config(config, num_devices=1)
  config = digits.get_config()
  config.model.name = 'ncsnv2_64'
  with pytest.raises(ValueError, match="needs model.convention='reference'"):
    builder.validate_config(config, num_devices=1)


@pytest.mark.parametrize('method,overrides', [
    ('pc', {}), ('ode', {}), ('ddim', {'sampling.eta': 1.0}), ('heun', {'sampling.churn': 2.0}),
    ('dpm_solver_2m', {'sampling.grid': 'log_snr'}), ('dpm_solver_3m', {}),
    ('dpm_solver_2s', {}), ('unipc', {'sampling.order': 3})])
def test_every_sampler_is_built_from_the_config(data_dir, method, overrides):
  """sampling.method picks any sampler (the sample and eval modes draw through it), with the
  config's steps, grid and per-solver setting; the report names what was run."""
  config = toy_config(data_dir, **{'sampling.method': method, 'sampling.steps': 6, **overrides})
  builder.validate_config(config, num_devices=1)
  comp = builder.build_components(config, (2,))
  params = comp.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  x, nfe = comp.sampler(jax.random.PRNGKey(1), comp.score_fn(params))
  assert x.shape == (config.sampling.batch_size, 2) and np.all(np.isfinite(np.asarray(x)))
  if method == 'pc':    # pc runs the SDE's N = sde.num_scales steps, not sampling.steps
    assert int(nfe) == 2 * config.sde.num_scales
  elif method != 'ode':
    per_step = 2 if method in ('heun', 'dpm_solver_2s') else 1
    assert int(nfe) == 6 * per_step + 1     # and the final denoise (sampling.noise_removal)
  described = builder.describe_sampler(config)
  assert described.startswith(f'{method}: ')
  for value in overrides.values():
    assert (f'{value:g}' if isinstance(value, float) else str(value)) in described
