"""The DDPM U-Net on CIFAR-10, sub-VP, continuous."""
from configs import architectures
from configs import base
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  base.set_sde(config, 'subvpsde')
  cifar10_base.vp_training(config)
  architectures.ddpm(config)
  return config
