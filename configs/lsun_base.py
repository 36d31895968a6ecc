"""LSUN at 256 px: batch 64, sigma_max 378, 2000 noise scales, snr 0.075, no dropout."""
from configs import cifar10_base


def get_config(category='bedroom'):
  config = cifar10_base.get_config()
  config.data.dataset = f'lsun/{category}'
  config.data.image_size = 256
  config.sde.sigma_max = 378.0
  config.sde.num_scales = 2000
  config.model.dropout = 0.0
  config.training.batch_size = 64
  config.training.n_iters = 2_400_000
  config.training.preemption_freq = 5000
  config.sampling.snr = 0.075
  config.sampling.batch_size = 64
  config.eval.batch_size = 512
  return config
