"""NCSN++ 1024 on CelebA-HQ 1024 (TFRecords), VE, continuous."""
from configs import base
from configs import hq_1024_base


def get_config():
  config = hq_1024_base.get_config('celebahq')
  base.set_sde(config, 'vesde')
  return config
