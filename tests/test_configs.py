"""Every config file: it loads, validates, builds its network, and the paper's networks have
the reference implementation's parameter counts (../shared/REFERENCE.md, section 5).

Counting uses abstract shapes (jax.eval_shape): paper-size networks are never initialized.
"""
import glob
import importlib
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

import run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_CONFIGS = ('base.py', 'architectures.py', '__init__.py')
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
    model = run_lib.make_model(config)
    x = jax.ShapeDtypeStruct((1,) + _shape(config), jnp.float32)
    discrete = config.training.loss in run_lib.losses.DISCRETE_LOSSES
    t = jax.ShapeDtypeStruct((1,), jnp.int32 if discrete else jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    _COUNTS[key] = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  return _COUNTS[key]


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_config_loads_validates_and_builds_its_network(path):
  config = _load(path)
  run_lib.validate_config(config, num_devices=1)
  assert run_lib.make_model(config) is not None


@pytest.mark.parametrize('name', sorted(EXPECTED_PARAMETERS))
def test_paper_network_has_the_reference_parameter_count(name):
  config = _load(os.path.join('configs', name + '.py'))
  assert _parameter_count(config) == EXPECTED_PARAMETERS[name]
