"""Shared helpers of the tests of the entry point's modules (builder, train_lib, eval_lib, run_lib)."""
import glob
import importlib
import os
import socket
import subprocess
import sys

import builder
import datasets
import eval_lib
from configs.toy import test as test_config


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_config(data_dir, **overrides):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def main_process(args, data_dir, env=None, config_file='configs/toy/test.py', **kwargs):
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--config', os.path.join(ROOT, config_file),
         f'--config.data.data_dir={data_dir}'] + args
  full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
  return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kwargs)


def restore_final(config, workdir):
  comp = builder.build(config)
  state, step = eval_lib.restore_for_eval(config, comp, workdir)
  return state, step


def tiny_paper_config(name, data_dir):
  """A paper config shrunk to run here: digits at 16 px, a narrow network, 20 noise levels."""
  config = importlib.import_module(f'configs.{name}').get_config()
  config.data.update(dataset='digits', image_size=16, num_channels=1, random_flip=False,
                     data_dir=data_dir)
  config.model.nf = 16
  if config.model.name in ('ncsnpp', 'ddpm'):
    config.model.update(ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
  config.sde.num_scales = 20
  config.training.update(batch_size=8, n_iters=2, log_freq=1, snapshot_freq=2, preemption_freq=1,
                         snapshot_sampling=False)
  config.sampling.update(num_samples=4, batch_size=4, n_steps_each=1)
  return config


def tiny_digits_config(data_dir):
  """configs/vp/digits.py shrunk: a narrow U-Net, 20 noise levels (the fewest VP's discrete
  chain takes: beta_max / N <= 1), 40 samples in rounds of 16."""
  from configs.vp import digits
  config = digits.get_config()
  config.data.data_dir = data_dir
  config.model.update(nf=8, ch_mult=(1,), embed_dim=16)
  config.sde.num_scales = 20
  config.training.update(batch_size=16, n_iters=2, log_freq=1, snapshot_freq=2, preemption_freq=1,
                         snapshot_sampling=False)
  config.sampling.update(num_samples=40, batch_size=16)   # rounds of 16, 16 and 8
  config.eval.update(batch_size=16, bpd_max_examples=32, bpd_num_repeats=2, rtol=1e-2, atol=1e-2)
  return config


def image_config_files():
  """Every config file of an image dataset (the toy ones hold continuous 2-D points)."""
  out = []
  for p in sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'), recursive=True)):
    if p.endswith(('base.py', 'architectures.py', 'rules.py', '__init__.py')):
      continue
    name = os.path.relpath(p, ROOT)[:-3].replace(os.sep, '.')
    if importlib.import_module(name).get_config().data.dataset not in datasets.TOY_DISTRIBUTIONS:
      out.append(name)
  return out


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]

