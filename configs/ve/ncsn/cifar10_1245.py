"""NCSN v1 on CIFAR-10 with NCSNv2's techniques 1, 2, 4 and 5 (the 124 settings plus EMA 0.999)."""
from configs.ve.ncsn import cifar10_124


def get_config():
  config = cifar10_124.get_config()
  config.model.ema_rate = 0.999
  return config
