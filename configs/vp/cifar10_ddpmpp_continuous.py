"""DDPM++ on CIFAR-10 under the VP SDE, continuous time: FID 2.55, 3.16 bits/dim (ODE)."""
from configs import architectures
from configs import base
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  base.set_sde(config, 'vpsde')
  cifar10_base.vp_training(config)
  architectures.ddpmpp(config)
  return config
