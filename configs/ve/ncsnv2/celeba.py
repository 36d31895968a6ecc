"""NCSNv2 on CelebA 64: 500 levels (sigma_max 90)."""
from configs import architectures
from configs import celeba_base


def get_config():
  config = celeba_base.get_config()
  architectures.ncsnv2(config, 'ncsnv2_64')
  config.sde.num_scales = 500
  config.sampling.n_steps_each = 5
  config.sampling.snr = 0.128
  return config
