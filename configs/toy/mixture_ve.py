"""The toy default under the VE SDE (sigma_max 10 covers the data's spread of ~4)."""
from configs.toy import mixture


def get_config():
  config = mixture.get_config()
  config.sde.name = 'vesde'
  config.sde.sigma_max = 10.0
  return config
