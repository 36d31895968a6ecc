"""FFHQ and CelebA-HQ at 1024 px (TFRecords): batch 8, sigma_max 1348, 2000 scales, snr 0.15."""
from configs import cifar10_base
from configs import architectures


def get_config(dataset='ffhq'):
  config = cifar10_base.get_config()
  config.data.dataset = dataset
  config.data.image_size = 1024
  config.sde.sigma_max = 1348.0
  config.sde.num_scales = 2000
  config.training.batch_size = 8
  config.training.n_iters = 2_400_000
  config.training.preemption_freq = 5000
  config.sampling.snr = 0.15
  config.eval.split = 'train'         # the TFRecords hold one split
  config.eval.stats_num_examples = 0  # every image (CelebA-HQ has only 30,000)
  config.sampling.batch_size = 8
  config.eval.batch_size = 8
  architectures.ncsnpp_1024(config)
  config.model.ema_rate = 0.9999
  config.model.scale_by_sigma = True
  return config
