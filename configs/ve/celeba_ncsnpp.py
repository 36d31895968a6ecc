"""NCSN++ on CelebA 64, VE, discrete time."""
from configs import architectures
from configs import base
from configs import celeba_base


def get_config():
  config = celeba_base.get_config()
  base.set_sde(config, 'vesde')
  architectures.ncsnpp(config, embedding='positional')
  config.model.scale_by_sigma = True
  config.training.loss = 'smld'
  return config
