"""Digits under the VP SDE, data centered to [-1, 1] as DDPM does."""
from configs import digits_base


def get_config():
  config = digits_base.get_config()
  config.sde.name = 'vpsde'
  config.data.centered = True
  return config
