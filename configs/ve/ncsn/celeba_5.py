"""NCSN v1 on CelebA 64 with technique 5 of NCSNv2 ("Improved Techniques"): an EMA of 0.999."""
from configs.ve.ncsn import celeba


def get_config():
  config = celeba.get_config()
  config.model.ema_rate = 0.999
  return config
