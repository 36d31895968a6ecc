"""Digits under the sub-VP SDE, data centered to [-1, 1]."""
from configs import base
from configs import digits_base


def get_config():
  config = digits_base.get_config()
  base.set_sde(config, 'subvpsde')
  config.data.centered = True
  return config
