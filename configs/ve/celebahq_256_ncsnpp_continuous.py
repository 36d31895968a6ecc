"""NCSN++ 256 on CelebA-HQ 256 (TFRecords), VE, continuous: the LSUN settings with sigma_max 348."""
from configs import architectures
from configs import base
from configs import lsun_base


def get_config():
  config = lsun_base.get_config()
  base.set_sde(config, 'vesde')
  config.eval.split = 'train'         # the TFRecords hold one split
  config.data.dataset = 'celebahq'
  architectures.ncsnpp_256(config)
  config.model.scale_by_sigma = True
  config.sde.sigma_max = 348.0
  return config
