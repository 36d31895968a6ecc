"""Digits under the VP SDE, data centered to [-1, 1] as DDPM does."""
from configs import base
from configs import digits_base


def get_config():
  config = digits_base.get_config()
  base.set_sde(config, 'vpsde')
  config.data.centered = True
  return config
