"""Every config file: it loads, validates, builds its network, and the paper's networks have
the reference implementation's parameter counts (../shared/REFERENCE.md, section 5) and,
field by field, the reference's config values (tests/reference_configs.py).

Counting uses abstract shapes (jax.eval_shape): paper-size networks are never initialized.
"""
import glob
import importlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import builder
import losses
import reference_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_CONFIGS = ('base.py', 'architectures.py', 'rules.py', '__init__.py')
CONFIG_FILES = sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'),
                                                recursive=True)
    if not p.endswith(_NOT_CONFIGS))

# The reference PyTorch implementation's parameter counts (REFERENCE.md section 5).
NCSNPP_FOURIER, NCSNPP_POSITIONAL = 62_758_915, 62_693_251
EXPECTED_PARAMETERS = {
    've/cifar10_ncsnpp_continuous': NCSNPP_FOURIER,
    've/cifar10': NCSNPP_FOURIER,
    've/cifar10_ncsnpp': NCSNPP_POSITIONAL,
    'vp/cifar10_ncsnpp': NCSNPP_POSITIONAL,
    'vp/cifar10_ncsnpp_continuous': NCSNPP_POSITIONAL,
    'subvp/cifar10_ncsnpp_continuous': NCSNPP_POSITIONAL,
    've/celeba_ncsnpp': NCSNPP_POSITIONAL,
    've/cifar10_ncsnpp_deep_continuous': 107_587_075,
    'vp/cifar10_ddpmpp': 61_804_419,
    'vp/cifar10_ddpmpp_continuous': 61_804_419,
    'vp/cifar10': 61_804_419,
    'subvp/cifar10_ddpmpp_continuous': 61_804_419,
    'subvp/cifar10': 61_804_419,
    'vp/cifar10_ddpmpp_deep_continuous': 106_632_579,
    'subvp/cifar10_ddpmpp_deep_continuous': 106_632_579,
    'vp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    'subvp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    've/cifar10_ddpm': 35_218_947,
    'vp/ddpm/cifar10': 35_218_947,
    'vp/ddpm/cifar10_continuous': 35_218_947,
    'subvp/cifar10_ddpm_continuous': 35_218_947,
    've/bedroom_ncsnpp_continuous': 65_574_549,
    've/church_ncsnpp_continuous': 65_574_549,
    've/ffhq_256_ncsnpp_continuous': 65_574_549,
    've/celebahq_256_ncsnpp_continuous': 65_574_549,
    'vp/ddpm/bedroom': 111_569_923,
    'vp/ddpm/church': 111_569_923,
    'vp/ddpm/celebahq': 111_569_923,
    # NCSN and NCSNv2: counted on the reference PyTorch models (tests/test_ncsnv2.py says how).
    've/ncsn/cifar10': 30_117_635,
    've/ncsn/celeba': 30_117_635,
    've/ncsn/cifar10_5': 30_117_635,
    've/ncsn/celeba_5': 30_117_635,
    've/ncsn/cifar10_124': 39_750_659,    # the conditional norms' embeddings grow with num_scales
    've/ncsn/cifar10_1245': 39_750_659,
    've/ncsn/celeba_124': 51_379_715,
    've/ncsn/celeba_1245': 51_379_715,
    've/ncsnv2/cifar10': 29_694_083,
    've/ncsnv2/celeba': 29_694_083,
    've/ncsnv2/bedroom': 83_445_379,
}


def _load(path):
  return importlib.import_module(path[:-3].replace(os.sep, '.')).get_config()


def _shape(config):
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


_COUNTS = {}


def _parameter_count(config):
  """Parameters of the config's network, from abstract shapes; one count per distinct network."""
  key = json.dumps([config.model.to_dict(), config.sde.to_dict(), _shape(config),
                    config.training.loss], sort_keys=True, default=str)
  if key not in _COUNTS:
    model = builder.make_model(config)
    x = jax.ShapeDtypeStruct((1,) + _shape(config), jnp.float32)
    discrete = config.training.loss in losses.DISCRETE_LOSSES
    t = jax.ShapeDtypeStruct((1,), jnp.int32 if discrete else jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    _COUNTS[key] = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  return _COUNTS[key]


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_config_loads_validates_and_builds_its_network(path):
  config = _load(path)
  builder.validate_config(config, num_devices=1)
  assert builder.make_model(config) is not None


@pytest.mark.parametrize('name', sorted(EXPECTED_PARAMETERS))
def test_paper_network_has_the_reference_parameter_count(name):
  config = _load(os.path.join('configs', name + '.py'))
  assert _parameter_count(config) == EXPECTED_PARAMETERS[name]


# Ours beyond the reference's files: each SDE's flagship alias, the digits and photos configs.
NOT_REFERENCE_CONFIGS = ('ve/cifar10', 'vp/cifar10', 'subvp/cifar10', 've/digits', 'vp/digits',
                         'subvp/digits', 'vp/photos', 've/cifar10_classifier')


def _field(config, dotted):
  node = config
  for key in dotted.split('.'):
    if key not in node:
      return '<missing>'
    node = node[key]
  return node


def _same(ours, ref):
  if isinstance(ours, (list, tuple)) or isinstance(ref, (list, tuple)):
    return isinstance(ours, (list, tuple)) and tuple(ours) == tuple(ref)
  if isinstance(ours, bool) or isinstance(ref, bool):
    return ours is ref
  return ours == ref


@pytest.mark.parametrize('name', sorted(reference_configs.REFERENCE))
def test_paper_config_equals_the_reference_field_by_field(name):
  config = _load(os.path.join('configs', name + '.py'))
  expected = reference_configs.expected_ours(name)
  differ = [f'  {field}: ours {_field(config, field)!r}, reference {value!r}'
            for field, value in sorted(expected.items())
            if not _same(_field(config, field), value)]
  assert not differ, f'{name} differs from the reference in {len(differ)} fields:\n' + '\n'.join(differ)


def test_every_paper_config_of_ours_is_in_the_reference_table():
  ours = {p[len('configs/'):-3] for p in CONFIG_FILES
          if p.startswith(('configs/ve/', 'configs/vp/', 'configs/subvp/'))}
  assert sorted(ours - set(reference_configs.REFERENCE)) == sorted(NOT_REFERENCE_CONFIGS)


def test_deliberate_differences_differ_and_have_reasons():
  for (name, field), (value, reason) in reference_configs.DELIBERATE.items():
    ref = reference_configs.REFERENCE[name]
    assert reason, (name, field)
    if value is reference_configs.DELETE:
      assert field in ref, f'{name}: {field} is not in the reference, nothing to delete'
    else:
      assert ref.get(field, '<missing>') != value, f'{name}: {field} equals the reference'


def test_reference_normalization_follows_from_the_model_name():
  for name, ref in reference_configs.REFERENCE.items():
    assert ref['model.normalization'] == reference_configs.NORMALIZATION[ref['model.name']], name


_DUMP_REFERENCE = """
import importlib, json, sys, types
# score_sde_pytorch's default configs import torch for config.device only.
sys.modules.setdefault('torch', types.SimpleNamespace(
    device=str, cuda=types.SimpleNamespace(is_available=lambda: False)))
sys.path.insert(0, '.')
def flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    out.update(flat(v, prefix + k + '.') if isinstance(v, dict) else {prefix + k: v})
  return out
print(json.dumps({n: flat(importlib.import_module('configs.' + n.replace('/', '.'))
                          .get_config().to_dict()) for n in sys.argv[1:]}, default=str))
"""
# Fields one framework's files add that concern no recipe: the PyTorch device, and the JAX
# training steps per jitted call (ours: training.steps_per_call, a throughput setting).
_FRAMEWORK_FIELDS = ('device', 'training.n_jitted_steps')


@pytest.mark.skipif(not os.environ.get('SCORE_SDE_REFERENCE_DIR'),
                    reason='set SCORE_SDE_REFERENCE_DIR to a score_sde or score_sde_pytorch checkout')
def test_reference_table_equals_the_reference_config_files():
  """Runs the reference's own config files (in a subprocess) and compares them with the table."""
  names = sorted(reference_configs.REFERENCE)
  out = subprocess.run([sys.executable, '-c', _DUMP_REFERENCE, *names], capture_output=True,
                       text=True, check=True, cwd=os.environ['SCORE_SDE_REFERENCE_DIR']).stdout
  differ = []
  for name, fields in json.loads(out).items():
    fields = {k: v for k, v in fields.items() if k not in _FRAMEWORK_FIELDS}
    table = reference_configs.REFERENCE[name]
    for field in sorted(set(fields) | set(table)):
      a, b = fields.get(field, '<missing>'), table.get(field, '<missing>')
      if not _same(b, a):
        differ.append(f'  {name} {field}: file {a!r}, table {b!r}')
  assert not differ, 'the table differs from the reference files:\n' + '\n'.join(differ)
