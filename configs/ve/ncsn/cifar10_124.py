"""NCSN v1 on CIFAR-10 with NCSNv2's techniques 1, 2 and 4: sigma_max 50, 232 geometric levels,
and NCSNv2's annealed Langevin sampler (step_lr 6.2e-6, 5 steps per level); no EMA."""
from configs import architectures
from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  architectures.ncsn(config)
  config.sde.num_scales = 232         # sigma_max stays the dataset's 50
  config.model.ema_rate = 0.0
  # NCSNv2's CIFAR-10 sampler: step_lr 6.2e-6, 5 steps per level (snr 0.176).
  architectures.annealed_langevin(config, step_lr=6.2e-6, n_steps_each=5)
  return config
