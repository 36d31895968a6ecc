"""The toy default under the VE SDE (sigma_max 10 covers the data's spread of ~4)."""
from configs import base
from configs.toy import mixture


def get_config():
  config = mixture.get_config()
  base.set_sde(config, 'vesde')
  config.sde.sigma_max = 10.0
  return config
