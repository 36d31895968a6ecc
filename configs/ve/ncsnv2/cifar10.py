"""NCSNv2 on CIFAR-10: 232 levels (sigma_max 50), 5 annealed Langevin steps per level."""
from configs import architectures
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  architectures.ncsnv2(config, 'ncsnv2_64')
  config.sde.num_scales = 232
  # NCSNv2's own sampler: step_lr 6.2e-6, 5 steps per level (snr 0.176 for the 'ald' corrector).
  architectures.annealed_langevin(config, step_lr=6.2e-6, n_steps_each=5)
  return config
