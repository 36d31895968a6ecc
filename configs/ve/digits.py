"""Digits under the VE SDE. sigma_max 12: about the largest distance between two 8x8x1 images in [0, 1]."""
from configs import base
from configs import digits_base


def get_config():
  config = digits_base.get_config()
  base.set_sde(config, 'vesde')
  config.sde.sigma_max = 12.0
  config.model.ema_rate = 0.999
  return config
