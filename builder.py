"""The one place that reads a config: it builds the SDE, model, loss, optimizer and sampler.

``build(config)`` reads the datasets and returns `Components`; ``build_components`` does
the same from a data shape alone (benchmarks, checkpoint import). Every mode (train, eval,
sample, stats) builds through here. Random streams are named once here (`stream_key`).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import datasets
import fast_samplers
import likelihood
import losses
import ode_solvers
import sampling
import sde_lib
from configs import rules
from models import score as score_lib
from models.mlp import ScoreMLP

# Named random streams: each use of randomness in a run draws from its own stream,
# fold_in(PRNGKey(config.seed), STREAMS[name]) (`stream_key`), or an integer seed drawn from
# it (`stream_seed`), so that two uses can never share a key by accident. Numbers are fixed
# once: append new streams, never renumber.
STREAMS = {
    'data': 0,                 # order and augmentation of the training batches (datasets.py)
    'init': 1,                 # network initialization
    'train': 2,                # training steps (folded with the step)
    'snapshot_samples': 3,     # the picture written at each snapshot
    'sample': 4,               # --mode sample
    'eval_loss': 5,            # eval loss (folded with the batch)
    'eval_bpd': 6,             # dequantization and Hutchinson probes (folded with pass, batch)
    'eval_samples': 7,         # evaluation samples (folded with the round)
    'toy_truth': 8,            # true samples the model's are compared with (toy data)
    'toy_truth_second': 9,     # a second true set: the energy distance floor
    'gaussian_ceiling': 10,    # samples of the Gaussian fit (the ceiling baseline)
    'baseline_dequantization': 11,   # the training data the bits/dim baselines are fit to
    'baseline_fit': 12,        # the Gaussian mixture baseline's initialization
    'kid_subsets': 13,         # KID's random subsets of the model's features
    'stats_kid_rows': 14,      # which dataset feature rows --mode stats keeps for KID
    'classifier_init': 15,     # the noise-conditional classifier's initialization
    'classifier_train': 16,    # its training noise and times
    'classifier_eval': 17,     # the noise of its accuracy report
    'conditional_samples': 18,  # --mode conditional
    'inverse_truth': 19,       # --mode inverse: which test images, their measurement noise
    'inverse_samples': 20,     # --mode inverse: the posterior samples
}


def stream_key(seed: int, name: str) -> jax.Array:
  """The PRNG key of the named stream ``name`` of a run with ``seed``."""
  if name not in STREAMS:
    raise ValueError(f'Unknown random stream {name!r}; valid: {sorted(STREAMS)}')
  return jax.random.fold_in(jax.random.PRNGKey(seed), STREAMS[name])


def stream_seed(seed: int, name: str) -> int:
  """A non-negative integer seed (numpy, scikit-learn, datasets) of the named stream."""
  return int(jax.random.randint(stream_key(seed, name), (), 0, 2**31 - 1))


def _check(cond, message):
  if not cond:
    raise ValueError(f'Invalid config: {message}')


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None):
  """Fails with a message that names the field for values the run cannot use.

  Every field's own rule (configs/rules.py), then the names the registries know and the
  rules that tie fields together.
  """
  num_devices = num_devices or jax.device_count()
  problems = rules.violations(config)
  _check(not problems, '\n  '.join(problems))
  _check(datasets.is_known_dataset(config.data.dataset),
         f'data.dataset={config.data.dataset!r}; valid: {", ".join(datasets.valid_names())}')
  _check(config.sde.name.lower() in sde_lib.SDES,
         f'sde.name={config.sde.name!r}; valid: {sorted(sde_lib.SDES)}')
  _check(config.model.name in MODELS, f'model.name={config.model.name!r}; valid: {sorted(MODELS)}')
  _check(config.model.convention in CONVENTIONS,
         f'model.convention={config.model.convention!r}; valid: {list(CONVENTIONS)}')
  if config.model.name in _REFERENCE_ONLY:
    _check(config.model.convention == 'reference',
           f"model.name={config.model.name!r} needs model.convention='reference' (its label "
           'indexes the noise levels)')
  if config.model.name == 'mlp':
    _check(config.model.convention == 'ours',
           "model.name='mlp' needs model.convention='ours' (its Fourier features embed t in [0, 1])")
  if config.model.convention == 'ours':
    _check(not config.model.scale_by_sigma,
           "model.scale_by_sigma needs model.convention='reference' (under 'ours' the network "
           'predicts the noise)')
  _check(config.training.loss in losses.LOSSES,
         f'training.loss={config.training.loss!r}; valid: {sorted(losses.LOSSES)}')
  _check(config.training.reduce in losses.REDUCTIONS,
         f'training.reduce={config.training.reduce!r}; valid: {list(losses.REDUCTIONS)}')
  if config.training.loss == 'smld':
    _check(config.sde.name == 'vesde', 'training.loss=smld needs sde.name=vesde')
  if config.training.loss == 'ddpm':
    _check(config.sde.name == 'vpsde', 'training.loss=ddpm needs sde.name=vpsde')
  _check(config.training.batch_size % num_devices == 0,
         f'training.batch_size={config.training.batch_size} is not divisible by the '
         f'{num_devices} devices')
  for field in ('preemption_freq', 'snapshot_freq', 'log_freq'):
    _check(config.training[field] % config.training.steps_per_call == 0,
           f'training.{field}={config.training[field]} must be a multiple of '
           f'training.steps_per_call={config.training.steps_per_call}')
  _check(config.sampling.method in sampling.SAMPLERS,
         f'sampling.method={config.sampling.method!r}; valid: {list(sampling.SAMPLERS)}')
  _check(config.sampling.grid in ('',) + tuple(fast_samplers.GRIDS),
         f"sampling.grid={config.sampling.grid!r}; valid: {[''] + sorted(fast_samplers.GRIDS)}")
  _check(config.sampling.predictor in sampling.PREDICTORS,
         f'sampling.predictor={config.sampling.predictor!r}; valid: {list(sampling.PREDICTORS)}')
  _check(config.sampling.corrector in sampling.CORRECTORS,
         f'sampling.corrector={config.sampling.corrector!r}; valid: {list(sampling.CORRECTORS)}')
  _check(config.sampling.ode_solver in ode_solvers.SOLVERS,
         f'sampling.ode_solver={config.sampling.ode_solver!r}; valid: {sorted(ode_solvers.SOLVERS)}')
  if is_image_data(config):
    _check(config.data.num_bits > 0,
           f'data.num_bits={config.data.num_bits} but {config.data.dataset} holds quantized '
           'images: set the bits per value (8), which bits/dim dequantization needs')
  _check(config.eval.hutchinson_type in likelihood.HUTCHINSON_TYPES,
         f'eval.hutchinson_type={config.eval.hutchinson_type!r}; valid: {list(likelihood.HUTCHINSON_TYPES)}')
  if config.sampling.corrector != 'none':   # pc, and the posterior samplers of --mode inverse
    _check(config.sampling.snr > 0,
           f'sampling.snr must be positive with corrector={config.sampling.corrector!r} (the '
           f"Langevin step's signal-to-noise ratio), got {config.sampling.snr}")
  sde = config.sde
  if sde.name.lower() == 'vesde':
    _check(0 < sde.sigma_min < sde.sigma_max,
           f'VE noise levels need 0 < sde.sigma_min < sde.sigma_max, got sigma_min='
           f'{sde.sigma_min}, sigma_max={sde.sigma_max}')
  else:
    _check(0 <= sde.beta_min < sde.beta_max,
           f'{sde.name} needs 0 <= sde.beta_min < sde.beta_max, got beta_min={sde.beta_min}, '
           f'beta_max={sde.beta_max}')
  if config.sampling.method == 'pc':
    # The sampler traced on a zero score, shapes only (no network, nothing compiled): a
    # setting it cannot run, such as VP's discrete chain with too few steps, fails at
    # start-up rather than when the first samples are drawn, after training.
    sampler = make_sampler(config, _sde_from_config(config), (1, 1))
    try:
      jax.eval_shape(lambda key: sampler(key, lambda x, t: jnp.zeros_like(x))[0],
                     jax.random.PRNGKey(0))
    except ValueError as e:
      _check(False, str(e))


def _make_mlp(config):
  return ScoreMLP(hidden=tuple(config.model.hidden), embed_dim=config.model.embed_dim)


def _make_refinenet(config):
  """NCSN v1 and NCSNv2 (RefineNets): the SMLD noise levels come from the sde section."""
  from models import ncsnv2
  cls = {'ncsn': ncsnv2.NCSN, 'ncsnv2_64': ncsnv2.NCSNv2, 'ncsnv2_128': ncsnv2.NCSNv2_128,
         'ncsnv2_256': ncsnv2.NCSNv2_256}[config.model.name]
  m, sde = config.model, config.sde
  return cls(nf=m.nf, num_scales=sde.num_scales, sigma_min=sde.sigma_min, sigma_max=sde.sigma_max,
             scale_by_sigma=m.scale_by_sigma, nonlinearity=m.nonlinearity,
             interpolation=m.interpolation, centered=config.data.centered)


def _discrete_sigmas(config):
  """The descending noise levels by which discrete VE networks scale their output, else None."""
  if not (config.model.scale_by_sigma and config.training.loss in losses.DISCRETE_LOSSES):
    return None
  sde = config.sde
  levels = sde_lib.VESDE(sigma_min=sde.sigma_min, sigma_max=sde.sigma_max,
                         N=sde.num_scales).descending_sigmas
  return tuple(float(s) for s in levels)


def _takes_inputs_as_they_are(config):
  """Under our convention the network sees c_in-scaled inputs: no [0, 1] -> [-1, 1] map."""
  return config.data.centered or config.model.convention == 'ours'


def _make_ncsnpp(config):
  from models.ncsnpp import NCSNpp
  m = config.model
  return NCSNpp(
      nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
      resamp_with_conv=m.resamp_with_conv, fir=m.fir, fir_kernel=tuple(m.fir_kernel),
      skip_rescale=m.skip_rescale, resblock_type=m.resblock_type, progressive=m.progressive,
      progressive_input=m.progressive_input, progressive_combine=m.progressive_combine,
      embedding_type=m.embedding_type, fourier_scale=m.fourier_scale,
      scale_by_sigma=m.scale_by_sigma, conditional=m.conditional, init_scale=m.init_scale,
      nonlinearity=m.nonlinearity, centered=_takes_inputs_as_they_are(config),
      sigmas=_discrete_sigmas(config), dtype=jnp.dtype(m.get('dtype', 'float32')))


def _make_ddpm(config):
  from models.ncsnpp import DDPM   # the DDPM U-Net is a preset of the NCSN++ family
  m = config.model
  return DDPM(nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
              attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
              resamp_with_conv=m.resamp_with_conv, scale_by_sigma=m.scale_by_sigma,
              conditional=m.conditional, nonlinearity=m.nonlinearity,
              centered=_takes_inputs_as_they_are(config), sigmas=_discrete_sigmas(config),
              dtype=jnp.dtype(m.get('dtype', 'float32')))


# name -> builder. The network-to-score convention is config.model.convention, not the
# name: 'ours' is models/score.network_score (noise prediction from unit-variance inputs,
# label t); 'reference' the paper's per-SDE labels and outputs
# (models/score.reference_network_score), which its networks' checkpoints need.
MODELS = {'mlp': _make_mlp, 'ncsnpp': _make_ncsnpp, 'ddpm': _make_ddpm, 'ncsn': _make_refinenet,
          'ncsnv2_64': _make_refinenet, 'ncsnv2_128': _make_refinenet,
          'ncsnv2_256': _make_refinenet}
CONVENTIONS = ('ours', 'reference')
_REFERENCE_ONLY = ('ncsn', 'ncsnv2_64', 'ncsnv2_128', 'ncsnv2_256')   # index sigmas by label


def make_model(config):
  """The flax network that ``config.model`` names (no data needed: shapes come at init)."""
  return MODELS[config.model.name](config)


class Components(NamedTuple):
  sde: sde_lib.SDE
  model: Any
  train_data: Any
  eval_data: Any
  data_shape: tuple
  data_std: float
  score_fn: Any         # params -> evaluation-mode score_fn(x, t) (params bound as leaves)
  loss_fn: Any          # (params, key, batch) -> scalar, training mode (dropout on)
  eval_loss_fn: Any     # (params, key, batch) -> scalar, evaluation mode (dropout off)
  optimizer: Any
  learning_rate: Any    # step -> learning rate (the optimizer's schedule, for logging)
  sampler: Any          # (key, score_fn) -> (samples, nfe), for sampling.batch_size samples
  scaler_slope: float


def _sde_from_config(config):
  name = config.sde.name.lower()
  if name == 'vesde':
    return sde_lib.VESDE(config.sde.sigma_min, config.sde.sigma_max, config.sde.num_scales)
  cls = sde_lib.SDES[name]
  return cls(config.sde.beta_min, config.sde.beta_max, config.sde.num_scales)


def dataset(config, split, batch_size, training, whole=False):
  """Training data: each host its own shard (``whole``: the unsharded stream), endless.

  Evaluation: one ordered pass over the whole split, on every host.
  """
  common = dict(image_size=config.data.image_size or None, centered=config.data.centered,
                data_dir=config.data.data_dir or None, seed=stream_seed(config.seed, 'data'),
                memory_budget_mb=config.data.memory_budget_mb, **_tfrecords(config))
  if training:
    shards = dict(shard_index=0, shard_count=1) if whole else {}
    return datasets.get_dataset(
        config.data.dataset, split=split,
        batch_size=batch_size if whole else batch_size // jax.process_count(),
        random_flip=config.data.random_flip,
        uniform_dequantization=config.data.uniform_dequantization, **common, **shards)
  return datasets.get_dataset(config.data.dataset, split=split, batch_size=batch_size,
                              shuffle=False, drop_remainder=False, num_epochs=1,
                              shard_index=0, shard_count=1, **common)


def _tfrecords(config):
  return dict(tfrecords_path=config.data.tfrecords_path) if config.data.tfrecords_path else {}


def _check_data_shape(config, data_shape):
  """Image data must have the size and channels that the config (and so the network) expects."""
  if len(data_shape) != 3:
    return
  h, w, c = data_shape
  if config.data.image_size and (h, w) != (config.data.image_size,) * 2:
    raise ValueError(f'Invalid config: data.image_size={config.data.image_size} but '
                     f'{config.data.dataset} gives {h}x{w} images')
  if c != config.data.num_channels:
    raise ValueError(f'Invalid config: data.num_channels={config.data.num_channels} but '
                     f'{config.data.dataset} has {c} channels')


def batch_x(batch):
  return batch['x'] if 'x' in batch else batch['image']


def is_image_data(config):
  return config.data.dataset not in datasets.TOY_DISTRIBUTIONS


def build(config, num_devices: int | None = None) -> Components:
  """Builds everything a run needs from the config: the only place that reads it."""
  validate_config(config, num_devices)
  train_data = dataset(config, 'train', config.training.batch_size, True)
  eval_data = dataset(config, config.eval.split, config.eval.batch_size, False)
  data_shape = tuple(train_data.data_shape)
  _check_data_shape(config, data_shape)
  # The std of the first global training batch scales the network's inputs. It is read
  # from the unsharded stream so that every host, and any host count, builds the same model.
  first = batch_x(dataset(config, 'train', config.training.batch_size, True, whole=True).batch(0))
  data_std = float(np.std(first))
  return build_components(config, data_shape, data_std, train_data, eval_data)


# The one setting of config.sampling each few-step solver reads beside steps and grid.
_SOLVER_SETTING = {'ddim': 'eta', 'heun': 'churn', 'unipc': 'order'}


def describe_sampler(config) -> str:
  """The config's sampler in one line, for reports: the method and the settings it reads."""
  s = config.sampling
  if s.method == 'pc':
    flow = ', probability flow' if s.probability_flow else ''
    what = (f'{s.predictor} + {s.corrector} (snr {s.snr:g}, {s.n_steps_each} step{flow}), '
            f'N = {config.sde.num_scales}')
  elif s.method == 'ode':
    what = f'{s.ode_solver}, rtol {s.rtol:g}, atol {s.atol:g}'
  else:
    grid = s.grid or fast_samplers.FAST_SAMPLERS[s.method].default_grid
    field = _SOLVER_SETTING.get(s.method)
    extra = f', {field} {s[field]:g}' if field else ''
    what = f'{s.steps} steps, {grid} grid{extra}'
  return f'{s.method}: {what}; eps {s.eps:g}, denoise {bool(s.noise_removal)}'


def make_sampler(config, sde, shape):
  """The config's sampler (``sampling`` section) for batches of ``shape``."""
  s = config.sampling
  options = dict(eps=s.eps, denoise=s.noise_removal)
  if s.method == 'pc':
    options.update(predictor=s.predictor, corrector=s.corrector, snr=s.snr,
                   n_steps=s.n_steps_each, probability_flow=s.probability_flow)
  elif s.method == 'ode':
    options.update(solver=s.ode_solver, rtol=s.rtol, atol=s.atol)
  else:
    options.update(steps=s.steps, grid=s.grid or None)
    if s.method in _SOLVER_SETTING:
      field = _SOLVER_SETTING[s.method]
      options[field] = s[field]
  return sampling.get_sampler(s.method, sde, shape, **options)


def build_components(config, data_shape, data_std: float = 1.0, train_data=None,
                     eval_data=None) -> Components:
  """The model, loss, optimizer and sampler for data of ``data_shape``; reads no data.

  ``build`` reads the datasets and calls this; benchmarks and checkpoint import call it
  alone (their Components have no datasets).
  """
  sde = _sde_from_config(config)
  data_shape = tuple(data_shape)
  model = make_model(config)
  continuous = config.training.loss not in losses.DISCRETE_LOSSES
  loss_impl = losses.get_loss(config.training.loss)
  kwargs = dict(reduce=config.training.reduce)
  if continuous:
    kwargs.update(eps=config.training.eps, likelihood_weighting=config.training.likelihood_weighting)
  if config.model.convention == 'reference':
    train_score = functools.partial(score_lib.reference_network_score, model, sde,
                                    continuous=continuous)
    score_fn = lambda params: score_lib.get_reference_score_fn(model, sde, params,
                                                               continuous=continuous)
  else:
    discrete_ddpm = config.training.loss == 'ddpm'
    train_score = functools.partial(score_lib.network_score, model, sde, data_std=data_std,
                                    discrete_ddpm=discrete_ddpm)
    score_fn = lambda params: score_lib.get_score_fn(model, sde, params, data_std=data_std,
                                                     discrete_ddpm=discrete_ddpm)

  def loss_fn(params, key, batch):
    k_loss, k_drop = jax.random.split(key)
    score = functools.partial(train_score, params, train=True, dropout_key=k_drop)
    return loss_impl(score, sde, k_loss, batch_x(batch), **kwargs)

  def eval_loss_fn(params, key, batch):
    # The network in evaluation mode (no dropout), as the reference's eval step; the loss's
    # own randomness (t, z) uses the same key split as in training.
    k_loss, _ = jax.random.split(key)
    return loss_impl(functools.partial(train_score, params), sde, k_loss, batch_x(batch),
                     **kwargs)

  if config.optim.warmup > 0:   # linear from 0 over `warmup` steps, as the reference
    schedule = optax.warmup_constant_schedule(0.0, config.optim.lr, config.optim.warmup)
  else:
    schedule = optax.constant_schedule(config.optim.lr)
  chain = []
  if config.optim.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(config.optim.grad_clip))
  chain.append(optax.adamw(schedule, b1=config.optim.beta1, eps=config.optim.eps,
                           weight_decay=config.optim.weight_decay))
  optimizer = optax.chain(*chain)

  sampler = make_sampler(config, sde, (config.sampling.batch_size,) + data_shape)
  return Components(sde, model, train_data, eval_data, data_shape, data_std, score_fn, loss_fn,
                    eval_loss_fn, optimizer, schedule, sampler,
                    2.0 if config.data.centered else 1.0)

