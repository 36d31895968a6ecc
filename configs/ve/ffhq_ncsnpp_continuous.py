"""NCSN++ 1024 on FFHQ 1024 (TFRecords), VE, continuous, mean reduction."""
from configs import base
from configs import hq_1024_base


def get_config():
  config = hq_1024_base.get_config('ffhq')
  base.set_sde(config, 'vesde')
  config.training.reduce = 'mean'
  return config
