"""builder.py: config checks and the one config-to-objects builder."""
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import builder
import datasets
import eval_lib
import parallel
import run_lib
import train_lib
from run_helpers import (ROOT, free_port, image_config_files, main_process, restore_final,
                         tiny_digits_config, tiny_paper_config, toy_config)
from configs.toy import test as test_config


def test_bad_configs_fail_with_clear_messages(data_dir):
  config = toy_config(data_dir)
  with pytest.raises(AttributeError, match='batchsize'):
    config.training.batchsize = 8      # misspelled key: the config is locked
  cases = [('sde.name', 'vp', r"sde.name='vp'; valid: \['subvpsde', 'vesde', 'vpsde'\]"),
           ('optim.lr', -1e-3, 'optim.lr must be positive, got -0.001'),
           ('sampling.predictor', 'heun', r"sampling.predictor='heun'; valid"),
           ('sampling.corrector', 'hmc', r"sampling.corrector='hmc'; valid"),
           ('training.loss', 'l1', r"training.loss='l1'"),
           ('training.batch_size', 0, 'training.batch_size must be positive')]
  for key, value, message in cases:
    config = toy_config(data_dir, **{key: value})
    with pytest.raises(ValueError, match=message):
      builder.validate_config(config, num_devices=1)
  config = toy_config(data_dir, **{'training.batch_size': 64})
  with pytest.raises(ValueError, match='batch_size=64 is not divisible by the 3 devices'):
    builder.validate_config(config, num_devices=3)


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
