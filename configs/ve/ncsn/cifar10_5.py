"""NCSN v1 on CIFAR-10 with technique 5 of NCSNv2 ("Improved Techniques"): an EMA of 0.999."""
from configs.ve.ncsn import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.ema_rate = 0.999
  return config
