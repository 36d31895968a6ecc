"""NCSN++ 256 on LSUN church_outdoor, VE, continuous (sigma_max 380)."""
from configs import architectures
from configs import base
from configs import lsun_base


def get_config():
  config = lsun_base.get_config('church_outdoor')
  base.set_sde(config, 'vesde')
  architectures.ncsnpp_256(config)
  config.model.scale_by_sigma = True
  config.sde.sigma_max = 380.0
  return config
