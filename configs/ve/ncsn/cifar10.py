"""NCSN v1 on CIFAR-10: ten levels from sigma 1 to 0.01, annealed Langevin with 100 steps per level."""
from configs import architectures
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  architectures.ncsn(config)
  config.sde.sigma_max = 1.0
  config.sde.num_scales = 10
  config.model.ema_rate = 0.0   # NCSN v1 used no EMA
  # NCSN's own sampler: step_lr 2e-5, 100 steps per level (snr 0.316 for the 'ald' corrector).
  architectures.annealed_langevin(config, step_lr=2e-5, n_steps_each=100)
  return config
