"""DDPM 256 on CelebA-HQ 256 (TFRecords): the discrete VP chain."""
from configs import architectures
from configs import base
from configs import cifar10_base
from configs import lsun_base


def get_config():
  config = lsun_base.get_config()
  base.set_sde(config, 'vpsde')
  config.eval.split = 'train'         # the TFRecords hold one split
  config.data.dataset = 'celebahq'
  cifar10_base.vp_training(config)
  architectures.ddpm(config, ch_mult=(1, 1, 2, 2, 4, 4))
  config.sde.num_scales = 1000
  config.training.loss = 'ddpm'
  config.sampling.predictor = 'ancestral_sampling'
  config.optim.lr = 2e-5            # the reference's rate at 256 px, a tenth of CIFAR-10's
  return config
