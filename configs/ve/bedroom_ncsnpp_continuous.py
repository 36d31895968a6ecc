"""NCSN++ 256 on LSUN bedroom, VE, continuous."""
from configs import architectures
from configs import base
from configs import lsun_base


def get_config():
  config = lsun_base.get_config('bedroom')
  base.set_sde(config, 'vesde')
  architectures.ncsnpp_256(config)
  config.model.scale_by_sigma = True
  return config
