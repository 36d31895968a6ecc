"""NCSN++ on CelebA 64, VE, discrete time."""
from configs import architectures
from configs import celeba_base


def get_config():
  config = celeba_base.get_config()
  config.sde.name = 'vesde'
  architectures.ncsnpp(config, embedding='positional')
  config.model.scale_by_sigma = True
  config.training.loss = 'smld'
  return config
