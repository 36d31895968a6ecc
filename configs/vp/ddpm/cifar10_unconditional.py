"""DDPM on CIFAR-10 without noise-level conditioning (the network never sees t)."""
from configs.vp.ddpm import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.conditional = False
  return config
