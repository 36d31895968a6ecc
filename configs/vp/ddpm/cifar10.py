"""DDPM (Ho et al. 2020) on CIFAR-10: the discrete VP chain, ancestral sampling."""
from configs import architectures
from configs import base
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  base.set_sde(config, 'vpsde')
  cifar10_base.vp_training(config)
  architectures.ddpm(config)
  config.training.loss = 'ddpm'
  config.sampling.predictor = 'ancestral_sampling'
  return config
