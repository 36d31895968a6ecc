"""Training, evaluation and sampling: the edge where configs, devices and files meet the core.

* ``build(config)`` is the one place that turns a config into objects (SDE, model,
  loss, sampler); every mode uses it.
* Parallelism: one ``jax.sharding.Mesh`` over all devices of all processes, the
  batch split along its 'data' axis, the train state replicated. The core
  modules stay single-device and pure.
* Files under ``workdir``: checkpoints/snapshots (the last few), checkpoints/preemption
  (the newest only, frequent), metrics.jsonl, tensorboard/, samples/, eval/.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import datasets
import evaluation
import likelihood
import losses
import ode_solvers
import plotting
import sampling
import sde_lib
from models import score as score_lib
from models.mlp import ScoreMLP

MODES = ('train', 'eval', 'sample', 'stats', 'all')


# -----------------------------------------------------------------------------
# Config checks and the one builder.
# -----------------------------------------------------------------------------


def _check(cond, message):
  if not cond:
    raise ValueError(f'Invalid config: {message}')


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None):
  """Fails with a message that names the field for values the run cannot use."""
  num_devices = num_devices or jax.device_count()
  _check(config.sde.name.lower() in sde_lib.SDES,
         f'sde.name={config.sde.name!r}; valid: {sorted(sde_lib.SDES)}')
  _check(config.sde.num_scales >= 2, f'sde.num_scales must be >= 2, got {config.sde.num_scales}')
  _check(config.model.name in MODELS, f'model.name={config.model.name!r}; valid: {sorted(MODELS)}')
  _check(0 <= config.model.ema_rate < 1, f'model.ema_rate must lie in [0, 1), got {config.model.ema_rate}')
  _check(config.model.get('dtype', 'float32') in ('float32', 'bfloat16'),
         f"model.dtype={config.model.get('dtype')!r}; valid: ['float32', 'bfloat16']")
  _check(config.training.loss in losses.LOSSES,
         f'training.loss={config.training.loss!r}; valid: {sorted(losses.LOSSES)}')
  _check(config.training.reduce in losses.REDUCTIONS,
         f'training.reduce={config.training.reduce!r}; valid: {list(losses.REDUCTIONS)}')
  if config.training.loss == 'smld':
    _check(config.sde.name == 'vesde', 'training.loss=smld needs sde.name=vesde')
  if config.training.loss == 'ddpm':
    _check(config.sde.name == 'vpsde', 'training.loss=ddpm needs sde.name=vpsde')
  for field in ('batch_size', 'n_iters', 'steps_per_call', 'log_freq', 'snapshot_freq',
                'preemption_freq', 'snapshot_keep'):
    value = config.training[field]
    _check(value > 0, f'training.{field} must be positive, got {value}')
  _check(config.training.batch_size % num_devices == 0,
         f'training.batch_size={config.training.batch_size} is not divisible by the '
         f'{num_devices} devices')
  for field in ('preemption_freq', 'snapshot_freq', 'log_freq'):
    _check(config.training[field] % config.training.steps_per_call == 0,
           f'training.{field}={config.training[field]} must be a multiple of '
           f'training.steps_per_call={config.training.steps_per_call}')
  _check(config.optim.lr > 0, f'optim.lr must be positive, got {config.optim.lr}')
  _check(config.optim.warmup >= 0, f'optim.warmup must be >= 0, got {config.optim.warmup}')
  _check(config.optim.grad_clip >= 0, f'optim.grad_clip must be >= 0, got {config.optim.grad_clip}')
  _check(config.sampling.method in ('pc', 'ode'),
         f"sampling.method={config.sampling.method!r}; valid: ['pc', 'ode']")
  _check(config.sampling.predictor in sampling.PREDICTORS,
         f'sampling.predictor={config.sampling.predictor!r}; valid: {list(sampling.PREDICTORS)}')
  _check(config.sampling.corrector in sampling.CORRECTORS,
         f'sampling.corrector={config.sampling.corrector!r}; valid: {list(sampling.CORRECTORS)}')
  _check(config.sampling.ode_solver in ode_solvers.SOLVERS,
         f'sampling.ode_solver={config.sampling.ode_solver!r}; valid: {sorted(ode_solvers.SOLVERS)}')
  for section, field in (('sampling', 'num_samples'), ('sampling', 'batch_size'),
                         ('eval', 'batch_size')):
    value = config[section][field]
    _check(value > 0, f'{section}.{field} must be positive, got {value}')
  if _is_image_data(config):
    _check(config.data.num_bits > 0,
           f'data.num_bits={config.data.num_bits} but {config.data.dataset} holds quantized '
           'images: set the bits per value (8), which bits/dim dequantization needs')
  _check(config.eval.hutchinson_type in likelihood.HUTCHINSON_TYPES,
         f'eval.hutchinson_type={config.eval.hutchinson_type!r}; valid: {list(likelihood.HUTCHINSON_TYPES)}')


def _make_mlp(config):
  return ScoreMLP(hidden=tuple(config.model.hidden), embed_dim=config.model.embed_dim)


def _make_unet(config):
  from models.unet import UNet   # imported here: toy runs need no U-Net
  return UNet(ch=config.model.nf, ch_mult=tuple(config.model.ch_mult),
              num_res_blocks=config.model.num_res_blocks,
              attn_resolutions=tuple(config.model.attn_resolutions),
              dropout=config.model.dropout, embed_dim=config.model.embed_dim)


def _make_refinenet(config):
  """NCSN v1 and NCSNv2 (RefineNets): the SMLD noise levels come from the sde section."""
  from models import ncsnv2
  cls = {'ncsn': ncsnv2.NCSN, 'ncsnv2_64': ncsnv2.NCSNv2, 'ncsnv2_128': ncsnv2.NCSNv2_128,
         'ncsnv2_256': ncsnv2.NCSNv2_256}[config.model.name]
  m, sde = config.model, config.sde
  return cls(nf=m.nf, num_scales=sde.num_scales, sigma_min=sde.sigma_min, sigma_max=sde.sigma_max,
             scale_by_sigma=m.scale_by_sigma, nonlinearity=m.nonlinearity,
             interpolation=m.interpolation, centered=config.data.centered)


# name: (builder, convention). Convention 'ours': models/score.network_score (noise
# prediction from unit-variance inputs); 'reference': the paper's networks, conditioned
# as the reference conditions them (models/score.reference_network_score).
def _discrete_sigmas(config):
  """The descending noise levels by which discrete VE networks scale their output, else None."""
  if not (config.model.scale_by_sigma and config.training.loss in losses.DISCRETE_LOSSES):
    return None
  sde = config.sde
  return tuple(float(s) for s in np.geomspace(sde.sigma_max, sde.sigma_min, sde.num_scales))


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
      nonlinearity=m.nonlinearity, centered=config.data.centered, sigmas=_discrete_sigmas(config),
      dtype=jnp.dtype(m.get('dtype', 'float32')))


def _make_ddpm(config):
  from models.ncsnpp import DDPM   # the DDPM U-Net is a preset of the NCSN++ family
  m = config.model
  return DDPM(nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
              attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
              resamp_with_conv=m.resamp_with_conv, scale_by_sigma=m.scale_by_sigma,
              conditional=m.conditional, nonlinearity=m.nonlinearity,
              centered=config.data.centered, sigmas=_discrete_sigmas(config),
              dtype=jnp.dtype(m.get('dtype', 'float32')))


# name: (builder, convention). Convention 'ours': models/score.network_score (noise
# prediction from unit-variance inputs); 'reference': the paper's networks, conditioned
# as the reference conditions them (models/score.reference_network_score).
MODELS = {'mlp': (_make_mlp, 'ours'), 'unet': (_make_unet, 'ours'),
          'ncsnpp': (_make_ncsnpp, 'reference'), 'ddpm': (_make_ddpm, 'reference'),
          'ncsn': (_make_refinenet, 'reference'), 'ncsnv2_64': (_make_refinenet, 'reference'),
          'ncsnv2_128': (_make_refinenet, 'reference'), 'ncsnv2_256': (_make_refinenet, 'reference')}


def make_model(config):
  """The flax network that ``config.model`` names (no data needed: shapes come at init)."""
  return MODELS[config.model.name][0](config)


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


def _dataset(config, split, batch_size, training, whole=False):
  """Training data: each host its own shard (``whole``: the unsharded stream), endless.

  Evaluation: one ordered pass over the whole split, on every host.
  """
  common = dict(image_size=config.data.image_size or None, centered=config.data.centered,
                data_dir=config.data.data_dir or None, seed=config.seed, **_tfrecords(config))
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


def _batch_x(batch):
  return batch['x'] if 'x' in batch else batch['image']


def build(config, num_devices: int | None = None) -> Components:
  """Builds everything a run needs from the config: the only place that reads it."""
  validate_config(config, num_devices)
  train_data = _dataset(config, 'train', config.training.batch_size, True)
  eval_data = _dataset(config, config.eval.split, config.eval.batch_size, False)
  data_shape = tuple(train_data.data_shape)
  _check_data_shape(config, data_shape)
  # The std of the first global training batch scales the network's inputs. It is read
  # from the unsharded stream so that every host, and any host count, builds the same model.
  first = _batch_x(_dataset(config, 'train', config.training.batch_size, True, whole=True).batch(0))
  data_std = float(np.std(first))
  return build_components(config, data_shape, data_std, train_data, eval_data)


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
  if MODELS[config.model.name][1] == 'reference':
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
    return loss_impl(score, sde, k_loss, _batch_x(batch), **kwargs)

  def eval_loss_fn(params, key, batch):
    # The network in evaluation mode (no dropout), as the reference's eval step; the loss's
    # own randomness (t, z) uses the same key split as in training.
    k_loss, _ = jax.random.split(key)
    return loss_impl(functools.partial(train_score, params), sde, k_loss, _batch_x(batch),
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

  shape = (config.sampling.batch_size,) + data_shape
  s = config.sampling
  if s.method == 'pc':
    sampler = sampling.get_pc_sampler(sde, shape, s.predictor, s.corrector, snr=s.snr,
                                      n_steps=s.n_steps_each, probability_flow=s.probability_flow,
                                      denoise=s.noise_removal, eps=s.eps)
  else:
    sampler = sampling.get_ode_sampler(sde, shape, solver=s.ode_solver, rtol=s.rtol, atol=s.atol,
                                       eps=s.eps, denoise=s.noise_removal)
  return Components(sde, model, train_data, eval_data, data_shape, data_std, score_fn, loss_fn,
                    eval_loss_fn, optimizer, schedule, sampler,
                    2.0 if config.data.centered else 1.0)


# -----------------------------------------------------------------------------
# Train state, the step, sharding.
# -----------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def init_state(config, comp: Components) -> TrainState:
  key = jax.random.PRNGKey(config.seed)
  dummy_x = jnp.zeros((1,) + comp.data_shape)
  params = comp.model.init(key, dummy_x, jnp.zeros((1,)))
  ema_params = jax.tree.map(jnp.copy, params)   # its own buffers: the state is donated
  return TrainState(jnp.zeros((), jnp.int32), params, ema_params, comp.optimizer.init(params))


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all processes); the batch is split along 'data'."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices, ('data',))


def ema_decay(ema_rate: float, step, warmup: bool = False):
  """The EMA decay of update number step + 1: ema_rate, or with ``warmup`` the PyTorch
  reference's min(ema_rate, (1 + n) / (10 + n)), n = step + 1 (score_sde in JAX uses the
  fixed rate). The warm-up forgets the random initialization within a few hundred steps;
  the fixed rate keeps a share ema_rate^n of it."""
  if not warmup:
    return ema_rate
  n = (step + 1).astype(jnp.float32)
  return jnp.minimum(ema_rate, (1.0 + n) / (10.0 + n))


def make_train_step(comp: Components, ema_rate: float, seed: int, unroll: bool | None = None,
                    ema_warmup: bool = False):
  """Steps of loss, gradients, optimizer update and EMA over ``[steps, batch, ...]`` batches.

  Keys are folded with the step. ``unroll`` writes the steps out instead of looping
  (default: on CPU only). XLA:CPU runs a convolution's gradient inside a loop body about
  30 times slower than in straight-line code (benchmarks/train_benchmark.py measures it),
  while accelerators prefer the loop, which compiles once for any number of steps.
  """
  if unroll is None:
    unroll = jax.default_backend() == 'cpu'
  base_key = jax.random.PRNGKey(seed + 1)

  def step(state: TrainState, batch):
    key = jax.random.fold_in(base_key, state.step)
    loss, grads = jax.value_and_grad(comp.loss_fn)(state.params, key, batch)
    updates, opt_state = comp.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(ema_rate, state.step, ema_warmup)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return TrainState(state.step + 1, params, ema, opt_state), loss

  def multi_step(state, batches):
    if not unroll:
      return jax.lax.scan(step, state, batches)
    # Written out step by step: scan(unroll=True) over one step is still a loop of one trip.
    losses = []
    for i in range(jax.tree.leaves(batches)[0].shape[0]):
      state, loss = step(state, jax.tree.map(lambda a, i=i: a[i], batches))
      losses.append(loss)
    return state, jnp.stack(losses)

  return multi_step


def compile_train_step(comp, config, mesh, unroll: bool | None = None):
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(None, 'data'))   # [steps_per_call, batch, ...]
  fn = make_train_step(comp, config.model.ema_rate, config.seed, unroll,
                       config.model.ema_warmup)
  return jax.jit(fn, in_shardings=(replicated, batch_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=0), batch_sharding


def global_batches(comp, start_step, steps, sharding):
  """The batches of steps [start, start + steps), each host's shard, as one global array."""
  local = [comp.train_data.batch(s) for s in range(start_step, start_step + steps)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *local)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), stacked)


# -----------------------------------------------------------------------------
# Checkpoints: the last few snapshots plus one frequent preemption checkpoint.
# -----------------------------------------------------------------------------


class Checkpoints:
  """Two orbax managers; a save is atomic (written to a temporary name, then renamed)."""

  def __init__(self, workdir, keep):
    root = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.snapshots = ocp.CheckpointManager(
        os.path.join(root, 'snapshots'), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.preemption = ocp.CheckpointManager(
        os.path.join(root, 'preemption'), options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  def latest(self):
    """(manager, step) of the newest checkpoint of either kind, or (None, 0)."""
    best = (None, 0)
    for mngr in (self.preemption, self.snapshots):
      step = mngr.latest_step()
      if step is not None and step > best[1]:
        best = (mngr, step)
    return best

  def restore(self, mngr, step, target):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError as e:
      raise ValueError(
          f'The checkpoint at step {step} in {mngr.directory} does not fit this config\'s model '
          f'or optimizer (was it written with another model.* or optim.* setting?): {e}') from e

  def save(self, mngr, step, state):
    mngr.save(step, args=ocp.args.StandardSave(state))

  def wait(self):
    self.snapshots.wait_until_finished()
    self.preemption.wait_until_finished()

  def close(self):
    self.snapshots.close()
    self.preemption.close()


# -----------------------------------------------------------------------------
# Logging: metrics.jsonl, TensorBoard event files, a progress line.
# -----------------------------------------------------------------------------


class _Progress:
  """A one-line progress bar with it/s and ETA (a log line each update when not a terminal)."""

  def __init__(self, total, start):
    self.total, self.start_step, self.t0 = total, start, time.time()
    self.tty = sys.stderr.isatty()

  def update(self, step, loss):
    elapsed = time.time() - self.t0
    rate = (step - self.start_step) / max(elapsed, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    frac = step / self.total
    bar = '#' * int(30 * frac) + '.' * (30 - int(30 * frac))
    line = (f'[{bar}] {step}/{self.total} {rate:7.1f} it/s ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}'
            f' loss {loss:.4f}')
    if self.tty:
      print('\r' + line, end='', file=sys.stderr, flush=True)
    else:
      print(line, file=sys.stderr, flush=True)

  def close(self):
    if self.tty:
      print(file=sys.stderr)


class _Metrics:
  """metrics.jsonl (lines past a resumed step are dropped) and TensorBoard scalars."""

  def __init__(self, workdir, resume_step):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.primary = jax.process_index() == 0
    if not self.primary:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
      with open(self.path, 'w') as f:
        f.writelines(kept)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1)
    except ImportError:   # optional: metrics.jsonl holds the same numbers
      self.tb = None

  def write(self, step, **scalars):
    if not self.primary:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(k, float(v), int(step))

  def close(self):
    if self.primary and self.tb is not None:
      self.tb.close()


# -----------------------------------------------------------------------------
# Train.
# -----------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
  pass


def train(config, workdir):
  """Trains, resuming from the newest checkpoint in ``workdir``. Returns the final state."""
  comp = build(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh()
  step_fn, batch_sharding = compile_train_step(comp, config, mesh)
  ckpts = Checkpoints(workdir, config.training.snapshot_keep)
  state = init_state(config, comp)
  mngr, start = ckpts.latest()
  if mngr is not None:
    state = ckpts.restore(mngr, start, state)
    print(f'Resuming from step {start} ({mngr.directory})', file=sys.stderr)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  metrics = _Metrics(workdir, start)
  progress = _Progress(config.training.n_iters, start)
  tc = config.training
  k = tc.steps_per_call
  step = start
  try:
    while step < tc.n_iters:
      n = min(k, tc.n_iters - step)
      batches = global_batches(comp, step, n, batch_sharding)
      new_state, loss = step_fn(state, batches)
      loss = np.asarray(loss)
      if not np.all(np.isfinite(loss)):
        bad = step + int(np.argmin(np.isfinite(loss))) + 1
        raise NonFiniteLossError(
            f'Loss became {loss[~np.isfinite(loss)][0]} at step {bad}; training stopped. The last '
            f'good checkpoint (step {ckpts.latest()[1]}) is kept in {workdir}/checkpoints.')
      state, step = new_state, step + n
      if step % tc.log_freq == 0 or step == tc.n_iters:
        metrics.write(step, loss=float(loss.mean()), learning_rate=float(comp.learning_rate(step)))
        progress.update(step, float(loss.mean()))
      if step % tc.snapshot_freq == 0 or step == tc.n_iters:
        ckpts.save(ckpts.snapshots, step, state)
        if tc.snapshot_sampling and jax.process_index() == 0:
          _snapshot_samples(config, comp, host_local(state.ema_params), workdir, step)
      elif step % tc.preemption_freq == 0:
        ckpts.save(ckpts.preemption, step, state)
  finally:
    progress.close()
    ckpts.wait()
    ckpts.close()
    metrics.close()
  print(f'process {jax.process_index()}: step {step}, params fingerprint '
        f'{params_fingerprint(state.params):.10e}', file=sys.stderr)
  return state


def params_fingerprint(params) -> float:
  """A float summary of replicated parameters, read from this process's own copy."""
  leaves = [np.asarray(x.addressable_data(0), np.float64) for x in jax.tree.leaves(params)]
  return float(sum(np.sum(np.abs(v)) + np.sum(v) * 1e-3 for v in leaves))


def _snapshot_samples(config, comp, params, workdir, step):
  """One batch of samples as a picture, on this process alone (``params`` host-local)."""
  x, _ = comp.sampler(jax.random.PRNGKey(config.seed + 2), comp.score_fn(params))
  path = os.path.join(workdir, 'samples', f'step_{step}.png')
  plotting.save_samples(path, np.asarray(x), config.data.dataset, centered=config.data.centered)


# -----------------------------------------------------------------------------
# Sampling and evaluation.
# -----------------------------------------------------------------------------


def host_local(tree):
  """This process's own copy of a pytree of replicated arrays, as single-device arrays.

  A replicated global array spans every process's devices; a computation that only
  one process runs (snapshot samples) or that each process runs on its own share
  (evaluation) needs the copy on one of its own devices.
  """
  return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def map_over_processes(fn, n, item_shape=()):
  """``[fn(0), ..., fn(n - 1)]``, process p computing the items i with i mod count = p.

  ``fn(i)`` returns an array of shape ``[length_i, *item_shape]`` (the length may vary
  with i). Every process gets all n results, in index order, as float32. With one
  process this is a plain loop.
  """
  count, me = jax.process_count(), jax.process_index()
  item_shape = tuple(item_shape)
  mine = [np.asarray(fn(i), np.float32).reshape((-1,) + item_shape) for i in range(me, n, count)]
  if count == 1:
    return mine
  from jax.experimental import multihost_utils
  lengths = np.zeros(-(-n // count), np.int32)   # at most ceil(n / count) items each
  lengths[:len(mine)] = [len(m) for m in mine]
  all_lengths = np.asarray(multihost_utils.process_allgather(lengths))   # [count, items]
  data = np.zeros((int(all_lengths.sum(axis=1).max()),) + item_shape, np.float32)
  if mine:
    flat = np.concatenate(mine)
    data[:len(flat)] = flat
  all_data = np.asarray(multihost_utils.process_allgather(data))          # [count, rows, ...]
  out = [None] * n
  for p in range(count):
    offsets = np.concatenate([[0], np.cumsum(all_lengths[p])])
    for j, i in enumerate(range(p, n, count)):
      out[i] = all_data[p, offsets[j]:offsets[j + 1]]
  return out


def _restore_for_eval(config, comp, workdir, step=None):
  ckpts = Checkpoints(workdir, config.training.snapshot_keep)
  # Shapes alone (restoring needs no initialised network), placed on this process's first
  # device as init_state's arrays would be.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                       jax.eval_shape(functools.partial(init_state, config, comp)))
  if step is None:
    mngr, step = ckpts.latest()
  else:
    mngr = ckpts.snapshots
  if mngr is None:
    ckpts.close()
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints: train first (--mode train).')
  state = ckpts.restore(mngr, step, state)
  ckpts.close()
  return state, step


def _draw_round(comp, score_fn, key, r):
  """Sampling round r: comp.sampler with the key fold_in(key, r). Returns (x, nfe)."""
  return comp.sampler(jax.random.fold_in(key, r), score_fn)


def sample_rounds(config, comp, params, key, num_samples, summarize=None, item_shape=None,
                  round_dir=None):
  """num_samples samples in rounds of sampling.batch_size, the last round trimmed.

  Round r uses the key fold_in(key, r), so the samples do not depend on how many processes
  share the rounds (process p draws the rounds r with r mod count = p), nor on resuming.

  Args:
    config, comp, params: the run's config, components and (replicated) parameters.
    key: the sampling key.
    num_samples: how many samples in all (the rounds add up to exactly this).
    summarize: ``(x [n, *data_shape], r) -> [n, *item_shape]``: what is kept of a round
      (features, say); default the samples themselves.
    item_shape: the shape of summarize's rows (default data_shape).
    round_dir: if given, each round's result is saved there (round_<r>.npz, atomically)
      and read back instead of drawn again: an evaluation killed mid-way resumes with the
      rounds it had finished.

  Returns:
    (the per-round results in order, nfe per sample of the last round).
  """
  bs = config.sampling.batch_size
  rounds = math.ceil(num_samples / bs)
  item_shape = tuple(comp.data_shape if item_shape is None else item_shape)
  score_fn = comp.score_fn(host_local(params))
  nfes = {}

  def one_round(r):
    count = min(bs, num_samples - r * bs)
    path = round_dir and os.path.join(round_dir, f'round_{r:06d}.npz')
    if path and os.path.exists(path):
      with np.load(path) as data:
        out, nfe = data['out'], int(data['nfe'])
      if out.shape == (count,) + item_shape:
        nfes[r] = nfe
        return out
    x, nfe = _draw_round(comp, score_fn, key, r)
    x = np.asarray(x)[:count]
    out = np.asarray(summarize(x, r) if summarize else x, np.float32)
    nfes[r] = int(nfe)
    if path:
      os.makedirs(round_dir, exist_ok=True)
      with open(path + '.tmp', 'wb') as f:
        np.savez(f, out=out, nfe=nfes[r])
      os.replace(path + '.tmp', path)
    return out

  out = map_over_processes(one_round, rounds, item_shape)
  nfe = map_over_processes(lambda r: np.array([nfes[r]]), rounds)[-1]
  return out, int(nfe[0])


def draw_samples(config, comp, params, key, num_samples):
  """num_samples samples in rounds of sampling.batch_size (the last round trimmed).

  Round r uses the key fold_in(key, r), so the samples do not depend on how many
  processes share the rounds. Returns (x, nfe), nfe per sample of the last round.
  """
  out, nfe = sample_rounds(config, comp, params, key, num_samples)
  return np.concatenate(out), nfe


def sample(config, workdir):
  """Writes samples/samples_<step>.npz (samples, nfe) and a PNG grid or scatter plot."""
  comp = build(config)
  state, step = _restore_for_eval(config, comp, workdir)
  x, nfe = draw_samples(config, comp, state.ema_params, jax.random.PRNGKey(config.seed + 3),
                        config.sampling.num_samples)
  npz = os.path.join(workdir, 'samples', f'samples_{step}.npz')
  png = os.path.join(workdir, 'samples', f'samples_{step}.png')
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
    np.savez(npz, samples=x, nfe=nfe, step=step)
    plotting.save_samples(png, x, config.data.dataset, centered=config.data.centered)
    print(f'{len(x)} samples at step {step} ({nfe} score evaluations per sample): {npz}, {png}')
  return npz, png


def energy_distance(x, y):
  """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets (V-statistics)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  d = lambda a, b: jnp.mean(jnp.sqrt(jnp.sum((a[:, None] - b[None]) ** 2, -1) + 1e-12))
  return float(2 * d(x, y) - d(x, x) - d(y, y))


REPORT_KEYS = ('step', 'eval_loss', 'bpd', 'bpd_stderr', 'nfe_likelihood', 'num_samples', 'nfe_sampling',
               'samples_png')
TOY_REPORT_KEYS = ('test_logp_true', 'test_logp_model', 'energy_distance_model',
                   'energy_distance_true_vs_true')
# Image data with eval.enable_fid / enable_kid / enable_inception_score; 'sample_features'
# names the network ('digits' or 'inception'). With eval.enable_baselines the report also has
# 'sample_baselines' {'held_out_real', 'gaussian_fit'} -> the same metrics (and num_samples),
# and, with enable_bpd, 'bpd_baselines' {'diagonal_gaussian', 'gaussian_mixture'} ->
# {'bpd', 'bpd_stderr'}.
SAMPLE_REPORT_KEYS = ('sample_features', 'fid', 'kid', 'kid_std', 'inception_score')


def _is_image_data(config):
  return config.data.dataset not in datasets.TOY_DISTRIBUTIONS


def _sample_metric_names(config):
  ec = config.eval
  names = [name for name, on in (('fid', ec.enable_fid), ('kid', ec.enable_kid),
                                 ('inception_score', ec.enable_inception_score)) if on]
  return names if _is_image_data(config) and ec.enable_sampling else []


def _feature_evaluator(config):
  """The feature network of a dataset: the digits classifier for 'digits', else the FID
  Inception network (weights from eval.inception_weights or $SCORE_SDE_INCEPTION_WEIGHTS)."""
  if config.data.dataset == 'digits':
    return evaluation.DigitsEvaluator()
  return evaluation.InceptionEvaluator(config.eval.inception_weights or None)


def _feature_name(config):
  return 'digits' if config.data.dataset == 'digits' else 'inception'


def stats_path(config, workdir):
  """eval.stats_path, or <workdir>/stats/<dataset>_<split>_<n>_<size>px_<features>.npz."""
  if config.eval.stats_path:
    return config.eval.stats_path
  ec = config.eval
  size = config.data.image_size or 'native'
  name = (f'{config.data.dataset.replace("/", "_")}_{ec.stats_split}_'
          f'{ec.stats_num_examples or "all"}_{size}px_{_feature_name(config)}.npz')
  return os.path.join(workdir, 'stats', name)


def _images_uint8(config, data, n):
  """The first n images of an ordered evaluation Dataset as uint8 batches (none dropped)."""
  inverse = datasets.inverse_scaler(config.data.centered)
  for i in range(math.ceil(n / data.batch_size)):
    x = _batch_x(data.batch(i))[:n - i * data.batch_size]
    yield evaluation.quantize_images(inverse(x))


def compute_stats(config, workdir, evaluator=None):
  """--mode stats: the reference features of the configured dataset, saved as .npz.

  The first eval.stats_num_examples images (0: all) of eval.stats_split, in stored order,
  without augmentation or dequantization, quantized to uint8 like the samples, through the
  feature network (`_feature_evaluator`); no last batch is dropped. The file (see
  `evaluation.save_reference`) holds mu, sigma (FID), eval.stats_kid_features feature rows
  (KID), the real data's Inception Score and what it was computed from; it is written
  atomically, and an existing file is kept.

  Returns:
    (path, reference).
  """
  path = stats_path(config, workdir)
  if os.path.exists(path):
    print(f'Dataset statistics exist: {path}', file=sys.stderr)
    return path, evaluation.load_reference(path)[0]
  ec = config.eval
  data = _dataset(config, ec.stats_split, ec.batch_size, False)
  n = ec.stats_num_examples or data.num_examples
  if n > data.num_examples:
    raise ValueError(f'eval.stats_num_examples={ec.stats_num_examples} but the {ec.stats_split!r} '
                     f'split of {config.data.dataset} has {data.num_examples} images')
  evaluator = evaluator or _feature_evaluator(config)
  reference, logits = evaluation.compute_reference(
      evaluator, _images_uint8(config, data, n), ec.stats_kid_features, n, seed=config.seed)
  is_mean, is_std = evaluation.inception_score(logits, min(ec.is_splits, n))   # real images
  if jax.process_index() == 0:
    evaluation.save_reference(path, reference, dataset=config.data.dataset, split=ec.stats_split,
                              image_size=int(data.data_shape[0]), features=evaluator.name,
                              inception_score=is_mean, inception_score_std=is_std)
    print(f'Statistics of {n} {config.data.dataset} images ({ec.stats_split}, '
          f'{evaluator.name} features): {path}', file=sys.stderr)
  return path, reference


def _load_stats(config, workdir, evaluator, data_shape):
  """The reference statistics for FID/KID; digits compute theirs when missing (a second)."""
  path = stats_path(config, workdir)
  if not os.path.exists(path):
    if evaluator.name == 'digits':
      return compute_stats(config, workdir, evaluator)[1]
    raise FileNotFoundError(
        f'No dataset statistics at {path} (eval.stats_path) for FID/KID: compute them once with '
        f'`python main.py --config <this config> --workdir {workdir} --mode stats`, or set '
        f'eval.stats_path to an existing file, or turn off eval.enable_fid and eval.enable_kid.')
  reference, meta = evaluation.load_reference(path)
  if meta.get('features') != evaluator.name:
    raise ValueError(f'{path} holds {meta.get("features")!r} features, not {evaluator.name!r}')
  if meta.get('image_size') != data_shape[0]:
    raise ValueError(f'{path} was computed at image_size={meta.get("image_size")}, but the '
                     f'data here is {data_shape[0]} px (data.image_size)')
  return reference


class _EvalContext(NamedTuple):
  """What every checkpoint's evaluation shares: computed once per `evaluate` call."""
  evaluator: Any = None
  reference: Any = None
  sample_baselines: dict | None = None
  bpd_baselines: dict | None = None


def _all_images(config, split):
  """Every image of a split, ordered, scaled as the model sees it (no dequantization)."""
  data = _dataset(config, split, config.eval.batch_size, False)
  return np.concatenate([_batch_x(data.batch(i)) for i in range(data.steps_per_epoch)])


def _eval_context(config, comp, workdir):
  """Loads the feature network and dataset statistics and computes the baselines."""
  names = _sample_metric_names(config)
  ec = config.eval
  context = _EvalContext()
  if names:
    evaluator = _feature_evaluator(config)
    reference = _load_stats(config, workdir, evaluator, comp.data_shape)
    context = context._replace(evaluator=evaluator, reference=reference)
  if not (ec.enable_baselines and _is_image_data(config)):
    return context
  train = _all_images(config, 'train')
  inverse = datasets.inverse_scaler(config.data.centered)
  if names:
    # Floor: held-out real images; ceiling: a Gaussian fit to the training images. Both as
    # many as the model's samples (the floor at most the whole eval split).
    n = config.sampling.num_samples
    held_out = inverse(_all_images(config, ec.split)[:n])
    mean, cov = evaluation.fit_gaussian(inverse(train))
    fake = evaluation.sample_gaussian(jax.random.PRNGKey(config.seed + 8), mean, cov, n,
                                      comp.data_shape)
    metrics = functools.partial(evaluation.sample_metrics, reference=context.reference,
                                metrics=names, kid_subsets=ec.kid_subsets,
                                kid_subset_size=ec.kid_subset_size,
                                is_splits=ec.is_splits, seed=config.seed)
    context = context._replace(sample_baselines={
        'held_out_real': metrics(*context.evaluator(held_out)),
        'gaussian_fit': metrics(*context.evaluator(evaluation.quantize_samples(fake)))})
  if ec.enable_bpd and config.data.num_bits:
    fit_data = _dequantize_eval(jax.random.PRNGKey(config.seed + 9), train, config.data.centered,
                                config.data.num_bits)
    fits = evaluation.fit_density_baselines(np.asarray(fit_data), ec.gmm_components,
                                            seed=config.seed)
    d = math.prod(comp.data_shape)

    def one_batch(k, x):
      return np.stack([evaluation.bits_per_dim(fit(np.asarray(x)), d, config.data.num_bits or 8,
                                               comp.scaler_slope) for fit in fits.values()], -1)

    results = np.concatenate(_bpd_passes(config, comp, one_batch, len(fits)))
    context = context._replace(bpd_baselines={
        name: {'bpd': float(results[:, j].mean()),
               'bpd_stderr': float(results[:, j].std() / np.sqrt(len(results)))}
        for j, name in enumerate(fits)})
  return context


def evaluate(config, workdir):
  """Evaluates every snapshot (begin_ckpt..end_ckpt) once; a report JSON per checkpoint.

  Reports already written are skipped, and within a checkpoint the sampling rounds already
  done (eval/rounds_<step>_<signature>/) are read back, so a preempted evaluation resumes
  where it stopped and gives the numbers of an uninterrupted one.
  """
  comp = build(config)
  ckpts = Checkpoints(workdir, config.training.snapshot_keep)
  steps = sorted(ckpts.snapshots.all_steps())
  ckpts.close()
  ec = config.eval
  steps = [s for s in steps if s >= ec.begin_ckpt and (ec.end_ckpt <= 0 or s <= ec.end_ckpt)]
  if not steps:
    raise FileNotFoundError(f'No snapshot to evaluate in {workdir}/checkpoints/snapshots.')
  eval_dir = os.path.join(workdir, 'eval')
  os.makedirs(eval_dir, exist_ok=True)
  written = []
  context = None
  for step in steps:
    path = os.path.join(eval_dir, f'report_{step}.json')
    if os.path.exists(path):
      written.append(path)
      continue
    context = context or _eval_context(config, comp, workdir)
    state, _ = _restore_for_eval(config, comp, workdir, step)
    report = _evaluate_checkpoint(config, comp, state, step, workdir, context)
    if jax.process_index() == 0:
      tmp = path + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
      os.replace(tmp, path)   # atomic: a report exists whole or not at all
      rounds = _round_dir(config, workdir, step)
      if os.path.isdir(rounds):
        shutil.rmtree(rounds)   # the report holds what they were kept for
      print(_report_summary(report), file=sys.stderr)
    written.append(path)
  return written


def _report_summary(report):
  """A few lines comparing the model with its baselines."""
  lines = [f'step {report["step"]}:']
  keys = ('fid', 'kid', 'inception_score')
  rows = [('model', report)] + list((report.get('sample_baselines') or {}).items())
  for name, row in rows:
    values = [f'{k} {row[k]:.4g}' for k in keys if k in row]
    if values:
      lines.append(f'  {name:14s} n={row.get("num_samples")} ' + ', '.join(values))
  if 'bpd' in report:
    lines.append(f'  bpd model {report["bpd"]:.4f} +- {report["bpd_stderr"]:.4f}' + ''.join(
        f'; {name} {b["bpd"]:.4f} +- {b["bpd_stderr"]:.4f}'
        for name, b in (report.get('bpd_baselines') or {}).items()))
  return '\n'.join(lines)


def _eval_batch_count(comp, max_examples):
  n = comp.eval_data.num_examples
  if max_examples:
    n = min(n, max_examples)
  return n, math.ceil(n / comp.eval_data.batch_size)


def _eval_batch(comp, max_examples, i):
  """Batch i of the (possibly truncated) test split; the last one may be short."""
  n, _ = _eval_batch_count(comp, max_examples)
  return _batch_x(comp.eval_data.batch(i))[: n - i * comp.eval_data.batch_size]


def _bpd_passes(config, comp, fn, width):
  """fn(key, x) -> [b, width] over eval.bpd_num_repeats passes of the test batches.

  Pass r, batch i uses key = fold_in(fold_in(PRNGKey(seed + 4), 1000 + r), i), and x is
  ``bpd_input(config, key, batch)``: quantized data dequantized afresh with this key, so the
  model and the baselines see the same noise. The work is shared among processes; returns
  the per-batch results in order.
  """
  ec = config.eval
  key = jax.random.PRNGKey(config.seed + 4)
  _, num_batches = _eval_batch_count(comp, ec.bpd_max_examples)

  def one_batch(j):
    r, i = divmod(j, num_batches)     # pass r over the test split, batch i
    k = jax.random.fold_in(jax.random.fold_in(key, 1000 + r), i)
    return fn(k, bpd_input(config, k, _eval_batch(comp, ec.bpd_max_examples, i)))

  return map_over_processes(one_batch, max(ec.bpd_num_repeats, 1) * num_batches, (width,))


def bpd_protocol(config, comp) -> dict:
  """How the report's bits/dim were computed, so that they compare with the paper's."""
  ec, num_bits = config.eval, config.data.num_bits
  n, _ = _eval_batch_count(comp, ec.bpd_max_examples)
  return {
      'split': ec.split, 'num_examples': n, 'passes': max(ec.bpd_num_repeats, 1),
      'dequantization': (f'uniform: (k + u) / 2^{num_bits}, u ~ U[0, 1), fresh each pass'
                         if num_bits else 'none (continuous data)'),
      'offset_bits': likelihood.bits_per_dim_offset(num_bits or None, comp.scaler_slope),
      'data_range': '[-1, 1]' if config.data.centered else '[0, 1]',
      'ode': f'probability flow from t = {config.training.eps:g} to T, dopri5 (diffrax), '
             f'rtol {ec.rtol:g}, atol {ec.atol:g}',
      'divergence': ec.hutchinson_type if ec.hutchinson_type == 'exact'
                    else f'Hutchinson-Skilling, one {ec.hutchinson_type} probe per solve',
      'parameters': 'EMA'}


# The feature networks of the reference's FID/IS (REFERENCE.md section 12) and how ours
# relates to them, by image size.
_COMPARABILITY_SMALL = (
    'pytorch-fid port of the Inception the reference used at 32 and 64 px (tf-gan, 2015 '
    'weights), with a torch-style resize: pytorch-fid reports FIDs that differ slightly '
    'from the TF implementation (about 0.08 absolute in its example).')
_COMPARABILITY_LARGE = (
    'NOT comparable with the reference: at 256 px and above it used TF-Hub\'s ImageNet '
    'inception_v3 feature vector (another network) on [0, 1] inputs, and reported no IS.')


def sample_protocol(config, workdir, evaluator, image_size: int) -> dict:
  """How the report's FID/KID/IS were computed: network and weight hash, resize,
  quantization, sample count, reference statistics and their hash, and how the numbers
  relate to the paper's."""
  ec = config.eval
  path = stats_path(config, workdir)
  out = dict(evaluator.protocol())
  out.update(
      quantization=f'{evaluation.SAMPLE_QUANTIZATION}: clip(255 x, 0, 255) cast to uint8 '
                   '(the reference\'s rule); real images round(255 x)',
      num_samples=config.sampling.num_samples,
      reference_statistics=os.path.abspath(path),
      reference_statistics_sha256=evaluation.file_sha256(path),
      inception_score_splits=ec.is_splits,
      kid=f'unbiased MMD^2, cubic kernel, {ec.kid_subsets} subsets of {ec.kid_subset_size}')
  if evaluator.name == 'inception':
    out['comparable_with_paper'] = (_COMPARABILITY_LARGE if image_size >= 256
                                    else _COMPARABILITY_SMALL)
  else:
    out['comparable_with_paper'] = 'no: the digits classifier is this codebase\'s own network'
  return out


def bpd_input(config, key, x):
  """What the likelihood sees of a test batch x: quantized data (data.num_bits > 0, every
  image dataset) uniformly dequantized with ``key``, whatever data.uniform_dequantization
  says about training, as the reference's bits/dim; continuous data as they are. Without
  dequantization a density on the 2^b-level grid is unbounded and bits/dim meaningless."""
  if config.data.num_bits:
    return _dequantize_eval(key, jnp.asarray(x), config.data.centered, config.data.num_bits)
  return jnp.asarray(x)


def _round_dir(config, workdir, step):
  """eval/rounds_<step>_<signature>: the signature hashes what the rounds depend on."""
  what = {'sampling': config.sampling.to_dict(), 'seed': config.seed,
          'features': _feature_name(config) if _sample_metric_names(config) else None}
  signature = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join(workdir, 'eval', f'rounds_{step}_{signature[:10]}')


def _evaluate_checkpoint(config, comp, state, step, workdir, context=None):
  """The report of one checkpoint; the batches and sample rounds are shared among processes.

  Batch i always uses the key fold_in(key, i), so the numbers do not depend on the
  process count. Sampling rounds are saved under eval/ as they finish (their features and
  logits for image data with sample metrics, else the samples) and reused on a rerun.
  """
  ec = config.eval
  context = context or _eval_context(config, comp, workdir)
  params = host_local(state.ema_params)
  report = {'step': int(step)}
  key = jax.random.PRNGKey(config.seed + 4)
  _, num_batches = _eval_batch_count(comp, ec.bpd_max_examples)
  batch = functools.partial(_eval_batch, comp, ec.bpd_max_examples)
  if ec.enable_loss:
    loss_fn = jax.jit(comp.eval_loss_fn)
    values = map_over_processes(
        lambda i: np.array([loss_fn(params, jax.random.fold_in(key, i), {'x': batch(i)})]),
        num_batches)
    report['eval_loss'] = float(np.mean(np.concatenate(values)))
  if ec.enable_bpd:
    num_bits = config.data.num_bits or None
    lik = likelihood.get_likelihood_fn(comp.sde, hutchinson_type=ec.hutchinson_type, rtol=ec.rtol,
                                       atol=ec.atol, eps=config.training.eps, num_bits=num_bits,
                                       scaler_slope=comp.scaler_slope)
    score_fn = comp.score_fn(params)

    def one_batch(k, x):
      res = lik(k, score_fn, x)
      # Columns: bpd, log p, and the solve's NFE (shared by the batch).
      return np.stack([np.asarray(res.bpd), np.asarray(res.logp),
                       np.full(len(x), int(res.nfe))], axis=-1)

    results = _bpd_passes(config, comp, one_batch, 3)
    bpd = np.concatenate([r[:, 0] for r in results])
    report['bpd'] = float(bpd.mean())
    report['bpd_stderr'] = float(bpd.std() / np.sqrt(len(bpd)))
    report['nfe_likelihood'] = float(np.mean([r[0, 2] for r in results]))
    report['test_logp_model'] = float(np.concatenate([r[:, 1] for r in results]).mean())
    report['bpd_protocol'] = bpd_protocol(config, comp)
    if context.bpd_baselines:
      report['bpd_baselines'] = context.bpd_baselines
  if ec.enable_sampling:
    names = _sample_metric_names(config)
    png = os.path.join(workdir, 'eval', f'samples_{step}.png')
    inverse = datasets.inverse_scaler(config.data.centered)

    def summarize(x, r):
      if r == 0:
        plotting.save_samples(png, x, config.data.dataset, centered=config.data.centered)
      features, logits = context.evaluator(evaluation.quantize_samples(inverse(x)))
      return np.concatenate([features, logits], axis=-1)

    round_dir = _round_dir(config, workdir, step)
    if names:
      ev = context.evaluator
      out, nfe = sample_rounds(config, comp, params, jax.random.PRNGKey(config.seed + 5),
                               config.sampling.num_samples, summarize,
                               (ev.feature_dim + ev.num_classes,), round_dir)
      out = np.concatenate(out)
      report.update(evaluation.sample_metrics(
          out[:, :ev.feature_dim], out[:, ev.feature_dim:], context.reference, metrics=names,
          kid_subsets=ec.kid_subsets, kid_subset_size=ec.kid_subset_size,
          is_splits=ec.is_splits, seed=config.seed))
      report['sample_features'] = ev.name
      report['sample_protocol'] = sample_protocol(config, workdir, ev, comp.data_shape[0])
      if context.sample_baselines:
        report['sample_baselines'] = context.sample_baselines
      report.update(num_samples=len(out), nfe_sampling=nfe, samples_png=os.path.abspath(png))
      return report
    out, nfe = sample_rounds(config, comp, params, jax.random.PRNGKey(config.seed + 5),
                             config.sampling.num_samples, round_dir=round_dir)
    x = np.concatenate(out)
    if jax.process_index() == 0:
      plotting.save_samples(png, x, config.data.dataset, centered=config.data.centered)
    report.update(num_samples=len(x), nfe_sampling=nfe, samples_png=os.path.abspath(png))
    log_prob = datasets.toy_log_prob(config.data.dataset)
    if x.ndim == 2:
      n = len(x)
      true_a = datasets.toy_sample(config.data.dataset, n, seed=config.seed + 6)
      true_b = datasets.toy_sample(config.data.dataset, n, seed=config.seed + 7)
      report['energy_distance_model'] = energy_distance(x, true_a)
      report['energy_distance_true_vs_true'] = energy_distance(true_b, true_a)
      if log_prob is not None:
        test = np.concatenate([batch(i) for i in range(num_batches)])
        report['test_logp_true'] = float(np.mean(log_prob(test)))
  return report


@functools.partial(jax.jit, static_argnames=('centered', 'num_bits'))
def _dequantize_eval(key, x, centered, num_bits=8):
  """Test images in [0, 1] (or [-1, 1]) back to integers k = round((2^b - 1) y), then
  uniformly dequantized to (k + u) / 2^b, u ~ U[0, 1) (likelihood.uniform_dequantize), and
  scaled back: the training data's dequantization, so bits/dim carry the offset
  b - log2(slope) of likelihood.py. Digits are stored on this 8-bit grid (17 grey levels
  at round(255 v / 16)), so they are dequantized as 8-bit images too."""
  y = (x + 1) / 2 if centered else x
  ints = jnp.round(jnp.asarray(y) * (2 ** num_bits - 1))
  y = likelihood.uniform_dequantize(key, ints, num_bits)
  return 2 * y - 1 if centered else y


def run(config, workdir, mode):
  """Dispatches one mode; 'all' trains, then evaluates. Returns the written paths.

  'stats' computes the dataset statistics that FID/KID compare with (`compute_stats`).
  'all' first checks that the evaluation can run (feature network, statistics), so that a
  missing file fails before training rather than after it.
  """
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; valid modes: {list(MODES)}')
  if mode == 'train':
    train(config, workdir)
    return []
  if mode == 'sample':
    return list(sample(config, workdir))
  if mode == 'eval':
    return evaluate(config, workdir)
  if mode == 'stats':
    return [compute_stats(config, workdir)[0]]
  if _sample_metric_names(config):
    shape = _dataset(config, config.eval.stats_split, 1, False).data_shape
    _load_stats(config, workdir, _feature_evaluator(config), shape)
  train(config, workdir)
  reports = evaluate(config, workdir)
  return reports
