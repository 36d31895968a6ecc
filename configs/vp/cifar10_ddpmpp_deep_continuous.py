"""DDPM++ deep on CIFAR-10, VP, continuous: FID 2.41, 3.13 bits/dim."""
from configs import architectures
from configs import base
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  base.set_sde(config, 'vpsde')
  cifar10_base.vp_training(config)
  architectures.ddpmpp(config, deep=True)
  config.training.n_iters = 950_000
  return config
