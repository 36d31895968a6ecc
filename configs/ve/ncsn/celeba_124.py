"""NCSN v1 on CelebA 64 with NCSNv2's techniques 1, 2 and 4: sigma_max 90, 500 geometric levels,
and NCSNv2's annealed Langevin sampler (step_lr 3.3e-6, 5 steps per level); no EMA."""
from configs import architectures
from configs import celeba_base


def get_config():
  config = celeba_base.get_config()
  architectures.ncsn(config)
  config.sde.num_scales = 500         # sigma_max stays the dataset's 90
  config.model.ema_rate = 0.0
  # NCSNv2's CelebA sampler: step_lr 3.3e-6, 5 steps per level (snr 0.128).
  architectures.annealed_langevin(config, step_lr=3.3e-6, n_steps_each=5)
  return config
