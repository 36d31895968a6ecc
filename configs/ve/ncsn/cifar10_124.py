"""NCSN v1 on CIFAR-10 with NCSNv2's techniques 1, 2 and 4: sigma_max 50, 232 geometric levels,
and 5 annealed Langevin steps per level at snr 0.176; no EMA."""
from configs import architectures
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  architectures.ncsn(config)
  config.sde.num_scales = 232         # sigma_max stays the dataset's 50
  config.model.ema_rate = 0.0
  config.sampling.n_steps_each = 5
  config.sampling.snr = 0.176
  return config
