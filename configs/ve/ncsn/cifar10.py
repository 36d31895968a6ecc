"""NCSN v1 on CIFAR-10: ten levels from sigma 1 to 0.01, annealed Langevin with 100 steps per level."""
from configs import architectures
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  architectures.ncsn(config)
  config.sde.sigma_max = 1.0
  config.sde.num_scales = 10
  config.model.ema_rate = 0.0   # NCSN v1 used no EMA
  config.sampling.n_steps_each = 100
  config.sampling.snr = 0.316
  return config
