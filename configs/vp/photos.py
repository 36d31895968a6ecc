"""16x16 colour patches of scikit-learn's two sample photographs (datasets.py 'photos', embedded,
offline) under the VP SDE: the digits network and recipe with three channels, data centered
to [-1, 1], random flips. A small colour model for colorization (docs/pretrained.ipynb, which
trains it briefly at --config.data.image_size=8)."""
from configs import base
from configs import digits_base


def get_config():
  config = digits_base.get_config()
  base.set_sde(config, 'vpsde')
  config.data.dataset = 'photos'
  config.data.num_channels = 3
  config.data.centered = True
  config.data.random_flip = True
  # No offline feature network fits colour patches (the digits classifier knows digits; the
  # FID Inception network needs downloaded weights and 16 px is far below its input size).
  config.eval.enable_fid = False
  config.eval.enable_kid = False
  config.eval.enable_inception_score = False
  config.conditional.scale = 1.0
  return config
