"""DDPM 256 on LSUN church_outdoor: the discrete VP chain (1000 steps)."""
from configs import architectures
from configs import cifar10_base
from configs import lsun_base


def get_config():
  config = lsun_base.get_config('church_outdoor')
  config.sde.name = 'vpsde'
  cifar10_base.vp_training(config)
  architectures.ddpm(config, ch_mult=(1, 1, 2, 2, 4, 4))
  config.sde.num_scales = 1000
  config.training.loss = 'ddpm'
  config.sampling.predictor = 'ancestral_sampling'
  return config
