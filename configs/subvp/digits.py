"""Digits under the sub-VP SDE, data centered to [-1, 1]."""
from configs import digits_base


def get_config():
  config = digits_base.get_config()
  config.sde.name = 'subvpsde'
  config.data.centered = True
  return config
