"""NCSN v1 on CelebA 64 with NCSNv2's techniques 1, 2, 4 and 5 (the 124 settings plus EMA 0.999)."""
from configs.ve.ncsn import celeba_124


def get_config():
  config = celeba_124.get_config()
  config.model.ema_rate = 0.999
  return config
