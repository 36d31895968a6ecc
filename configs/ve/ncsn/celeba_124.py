"""NCSN v1 on CelebA 64 with NCSNv2's techniques 1, 2 and 4: sigma_max 90, 500 geometric levels,
and 5 annealed Langevin steps per level at snr 0.128; no EMA."""
from configs import architectures
from configs import celeba_base


def get_config():
  config = celeba_base.get_config()
  architectures.ncsn(config)
  config.sde.num_scales = 500         # sigma_max stays the dataset's 90
  config.model.ema_rate = 0.0
  config.sampling.n_steps_each = 5
  config.sampling.snr = 0.128
  return config
