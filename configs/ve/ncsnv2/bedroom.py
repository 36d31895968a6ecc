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
  config.sampling.n_steps_each = 3
  config.sampling.snr = 0.095
  return config
