"""NCSN++ (Fourier embedding) on CIFAR-10 under the VE SDE, continuous time: the paper's FID 2.38 model."""
from configs import architectures
from configs import base
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  base.set_sde(config, 'vesde')
  architectures.ncsnpp(config)
  config.model.scale_by_sigma = True   # VE: the network outputs score * sigma
  return config
