"""NCSN++ 1024 on FFHQ 1024 (TFRecords), VE, continuous, mean reduction."""
from configs import hq_1024_base


def get_config():
  config = hq_1024_base.get_config('ffhq')
  config.sde.name = 'vesde'
  config.training.reduce = 'mean'
  return config
