"""Toy 2-D 'swiss_roll' data: the mixture default with another distribution."""
from configs.toy import mixture


def get_config():
  config = mixture.get_config()
  config.data.dataset = 'swiss_roll'
  return config
