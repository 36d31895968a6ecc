"""NCSN++ (positional) on CIFAR-10, VP, discrete time, reverse-diffusion sampling."""
from configs import architectures
from configs import base
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  base.set_sde(config, 'vpsde')
  cifar10_base.vp_training(config)
  architectures.ncsnpp(config, embedding='positional')
  config.training.loss = 'ddpm'
  config.sampling.predictor = 'reverse_diffusion'
  return config
