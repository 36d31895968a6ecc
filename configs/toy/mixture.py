"""The embedded default: a 3-mode 2-D Gaussian mixture (known density), VP SDE, small MLP.

Runs end to end (train, sample, evaluate) in a few minutes on 2 CPU cores.
"""
from configs import base


def get_config():
  config = base.get_base_config()   # the base is already the toy default
  return config
