"""NCSNv2 on CIFAR-10: 232 levels (sigma_max 50), 5 annealed Langevin steps per level."""
from configs import architectures
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  architectures.ncsnv2(config, 'ncsnv2_64')
  config.sde.num_scales = 232
  config.sampling.n_steps_each = 5
  config.sampling.snr = 0.176
  return config
