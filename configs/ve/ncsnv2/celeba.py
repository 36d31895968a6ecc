"""NCSNv2 on CelebA 64: 500 levels (sigma_max 90)."""
from configs import architectures
from configs import celeba_base


def get_config():
  config = celeba_base.get_config()
  architectures.ncsnv2(config, 'ncsnv2_64')
  config.sde.num_scales = 500
  # NCSNv2's own sampler: step_lr 3.3e-6, 5 steps per level (snr 0.128 for the 'ald' corrector).
  architectures.annealed_langevin(config, step_lr=3.3e-6, n_steps_each=5)
  return config
