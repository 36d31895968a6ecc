"""NCSN++ deep (8 blocks per level) on CIFAR-10, VE, continuous: FID 2.20."""
from configs import architectures
from configs import base
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  base.set_sde(config, 'vesde')
  architectures.ncsnpp(config, deep=True)
  config.model.scale_by_sigma = True
  config.training.n_iters = 950_000   # the deep models train shorter
  return config
