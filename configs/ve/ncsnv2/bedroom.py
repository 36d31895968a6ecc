"""NCSNv2 on LSUN bedroom at 128 px: 1086 levels up to sigma 190."""
from configs import architectures
from configs import lsun_base


def get_config():
  config = lsun_base.get_config('bedroom')
  architectures.ncsnv2(config, 'ncsnv2_128')
  config.data.image_size = 128
  config.sde.sigma_max = 190.0
  config.sde.num_scales = 1086
  config.training.batch_size = 128
  config.model.ema_rate = 0.9999
  # NCSNv2's own sampler: step_lr 1.8e-6, 3 steps per level (snr 0.095 for the 'ald' corrector).
  architectures.annealed_langevin(config, step_lr=1.8e-6, n_steps_each=3)
  return config
