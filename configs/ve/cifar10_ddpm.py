"""The DDPM U-Net trained as an SMLD model (VE, discrete time), output scaled by 1/sigma."""
from configs import architectures
from configs import base
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  base.set_sde(config, 'vesde')
  architectures.ddpm(config)
  config.model.scale_by_sigma = True
  config.training.loss = 'smld'
  return config
