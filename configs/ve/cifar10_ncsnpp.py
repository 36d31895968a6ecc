"""NCSN++ on CIFAR-10, VE, discrete time (SMLD noise levels, positional embedding of the level)."""
from configs import architectures
from configs import base
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  base.set_sde(config, 'vesde')
  architectures.ncsnpp(config, embedding='positional')
  config.model.scale_by_sigma = True
  config.training.loss = 'smld'       # discrete: one of N levels per example
  return config
