"""Toy 2-D 'rings' data: the mixture default with another distribution."""
from configs.toy import mixture


def get_config():
  config = mixture.get_config()
  config.data.dataset = 'rings'
  return config
