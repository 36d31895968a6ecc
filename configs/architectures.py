"""The paper's network settings, each written once; the config files pick one and override a few fields.

Values follow the reference configurations (score_sde, Song et al. 2021); each
function sets the ``model`` section of a config in place and returns the config.
"""
from configs import base


def _ncsnpp_common(model):
  model.name = 'ncsnpp'
  model.convention = 'reference'    # the paper's labels and outputs: its checkpoints need them
  model.nf = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 4
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  model.skip_rescale = True
  model.resblock_type = 'biggan'
  model.progressive = 'none'
  model.progressive_combine = 'sum'
  model.init_scale = 0.0
  model.fourier_scale = 16.0
  model.nonlinearity = 'swish'


def ncsnpp(config, *, deep=False, embedding='fourier'):
  """NCSN++: FIR resampling, residual input pyramid, BigGAN blocks (deep: 8 blocks per level)."""
  model = config.model
  _ncsnpp_common(model)
  model.num_res_blocks = 8 if deep else 4
  model.fir = True
  model.fir_kernel = (1, 3, 3, 1)
  model.progressive_input = 'residual'
  model.embedding_type = embedding
  return config


def ddpmpp(config, *, deep=False):
  """DDPM++: NCSN++ without FIR and without the input pyramid, positional embedding."""
  model = config.model
  _ncsnpp_common(model)
  model.num_res_blocks = 8 if deep else 4
  model.fir = False
  model.progressive_input = 'none'
  model.embedding_type = 'positional'
  return config


def ncsnpp_256(config):
  """NCSN++ for 256 px (LSUN, FFHQ, CelebA-HQ): seven levels, output and input skips."""
  ncsnpp(config)
  model = config.model
  model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
  model.num_res_blocks = 2
  model.progressive = 'output_skip'
  model.progressive_input = 'input_skip'
  return config


def ncsnpp_1024(config):
  """NCSN++ for 1024 px (FFHQ, CelebA-HQ): nf 16, eight levels, one block per level."""
  ncsnpp_256(config)
  model = config.model
  model.nf = 16
  model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
  model.num_res_blocks = 1
  model.dropout = 0.0
  return config


def ddpm(config, *, ch_mult=(1, 2, 2, 2)):
  """The DDPM U-Net of Ho et al. (2020): two DDPM blocks per level, positional embedding."""
  model = config.model
  model.name = 'ddpm'
  model.convention = 'reference'
  model.nf = 128
  model.ch_mult = ch_mult
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  model.nonlinearity = 'swish'
  model.embedding_type = 'positional'
  return config


def ncsnv2(config, name='ncsnv2_64'):
  """NCSNv2 (RefineNet, InstanceNorm++, output divided by sigma), trained on discrete VE levels."""
  model = config.model
  model.name = name
  model.convention = 'reference'
  model.nf = 128
  model.scale_by_sigma = True
  model.interpolation = 'bilinear'
  model.nonlinearity = 'elu'
  config.optim.lr = 1e-4
  _ncsn_training(config)
  return config


def ncsn(config):
  """NCSN v1 (conditional RefineNet, conditional InstanceNorm++), ten noise levels."""
  model = config.model
  model.name = 'ncsn'
  model.convention = 'reference'
  model.nf = 128
  model.scale_by_sigma = False
  model.interpolation = 'bilinear'
  model.nonlinearity = 'elu'
  config.optim.lr = 1e-3
  _ncsn_training(config)
  return config


def _ncsn_training(config):
  """NCSN/NCSNv2 training and sampling: SMLD loss, no warm-up, no clipping, annealed Langevin."""
  base.set_sde(config, 'vesde')
  config.training.loss = 'smld'
  config.optim.warmup = 0
  config.optim.grad_clip = 0.0
  config.sampling.predictor = 'none'
  config.sampling.corrector = 'ald'


def annealed_langevin(config, *, step_lr, n_steps_each):
  """NCSN's sampler settings in NCSN's own terms: its step_lr and steps per noise level.

  The 'ald' corrector reads sampling.snr; NCSN's step eps_i = step_lr sigma_i^2 / sigma_min^2
  is the corrector's 2 (snr sigma_i)^2 for snr = sqrt(step_lr / 2) / sigma_min
  (sampling.ald_snr_from_step_lr), which the reference's configs write to three decimals
  (step_lr 2e-5 -> 0.316, a step 0.14% smaller than NCSN's): so is it set here. Call it
  after the sde section is final (it reads sde.sigma_min).
  """
  import sampling   # here: configs that do not sample NCSN-style import no JAX
  snr = sampling.ald_snr_from_step_lr(step_lr, config.sde.sigma_min)
  config.sampling.snr = round(snr, 3)
  config.sampling.n_steps_each = n_steps_each
  return config
