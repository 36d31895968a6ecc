"""scikit-learn's 8x8 digits (embedded, offline) with a small U-Net: the image default."""
from configs import base


def get_config():
  config = base.get_base_config()
  config.data.dataset = 'digits'
  config.data.uniform_dequantization = True
  config.data.num_bits = 8
  config.data.num_channels = 1
  config.model.name = 'unet'
  config.model.embed_dim = 128
  config.training.batch_size = 128
  config.training.n_iters = 20000
  config.training.snapshot_freq = 5000
  config.training.preemption_freq = 1000
  config.optim.lr = 2e-4
  config.optim.warmup = 1000
  config.sampling.num_samples = 500
  config.sampling.batch_size = 500
  config.eval.batch_size = 500
  config.eval.bpd_num_repeats = 5     # as the reference does for dequantized test data
  config.eval.bpd_max_examples = 0
  # digits-FID/KID/IS with the embedded classifier, beside the held-out and Gaussian baselines.
  config.eval.enable_fid = True
  config.eval.enable_kid = True
  config.eval.enable_inception_score = True
  config.eval.enable_baselines = True
  return config
