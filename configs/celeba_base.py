"""CelebA at 64 px (centre crop 140, as the reference): sigma_max 90, snr 0.17."""
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.data.dataset = 'celeb_a'
  config.data.image_size = 64
  config.sde.sigma_max = 90.0
  config.sampling.snr = 0.17
  return config
