"""CIFAR-10 as the reference trains it (Song et al. 2021, Appendix and score_sde's defaults)."""
from configs import base


def get_config():
  config = base.get_base_config()
  data = config.data
  data.dataset = 'cifar10'
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.num_bits = 8

  training = config.training
  training.batch_size = 128
  training.n_iters = 1_300_000
  training.reduce = 'sum'             # the reference's reduce_mean=False (VP/sub-VP set 'mean')
  training.log_freq = 50
  training.snapshot_freq = 50_000
  training.preemption_freq = 10_000
  training.snapshot_keep = 30

  config.model.dropout = 0.1
  config.model.ema_warmup = False     # the paper's runs (score_sde in JAX): a fixed EMA decay
  config.optim.lr = 2e-4
  config.optim.warmup = 5000
  config.optim.grad_clip = 1.0

  sampling = config.sampling
  sampling.snr = 0.16
  sampling.num_samples = 50_000       # the FID protocol
  sampling.batch_size = 1000

  evaluate = config.eval
  evaluate.batch_size = 1024
  evaluate.bpd_num_repeats = 5
  evaluate.bpd_max_examples = 0
  evaluate.enable_bpd = False         # switch on for likelihoods (dequantizes the test split)
  # FID/KID/IS need the FID Inception weights (eval.inception_weights or
  # $SCORE_SDE_INCEPTION_WEIGHTS) and the statistics of --mode stats (all 50,000 training images).
  evaluate.enable_fid = True
  evaluate.enable_kid = True
  evaluate.enable_inception_score = True
  evaluate.stats_num_examples = 50_000
  return config


def vp_training(config):
  """What every VP and sub-VP CIFAR-10 config shares: centered data, mean reduction, EMA 0.9999."""
  config.data.centered = True
  config.training.reduce = 'mean'
  config.model.ema_rate = 0.9999
  config.sampling.predictor = 'euler_maruyama'
  config.sampling.corrector = 'none'
  return config
