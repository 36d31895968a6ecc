"""NCSN v1 on CelebA 64: ten levels from sigma 1 to 0.01."""
from configs import architectures
from configs import celeba_base


def get_config():
  config = celeba_base.get_config()
  architectures.ncsn(config)
  config.sde.sigma_max = 1.0
  config.sde.num_scales = 10
  config.model.ema_rate = 0.0
  # NCSN's own sampler: step_lr 2e-5, 100 steps per level (snr 0.316 for the 'ald' corrector).
  architectures.annealed_langevin(config, step_lr=2e-5, n_steps_each=100)
  return config
