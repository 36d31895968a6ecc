#!/usr/bin/env python
"""Makes tests/fixtures/import_*: tiny reference checkpoints and the reference's outputs.

The checkpoint-import tests (tests/test_checkpoint_import.py) convert these files with
checkpoint_import.py and compare our network's outputs with the ones the reference code
computed here. Nothing of the reference is copied: this script imports it from a local
clone given on the command line and writes only weights, inputs and outputs.

PyTorch fixtures (score_sde_pytorch; run with a Python that has torch; no GPU is used):

  mkdir /tmp/ssp && git -C <score_sde_pytorch clone> archive HEAD | tar -x -C /tmp/ssp
  python scripts/make_import_fixtures.py torch --reference_dir /tmp/ssp

  For each tiny config this does what the reference's run_lib.train does, with the
  reference's own functions: models.utils.create_model (the DataParallel wrapper: 'module.*'
  keys), models.ema.ExponentialMovingAverage over model.parameters(), losses.get_optimizer
  (Adam) and losses.get_step_fn with the config's SDE and loss, run for STEP steps on random
  data (lr LR, no warm-up: with the EMA's decay warming up as min(decay, (1 + n)/(10 + n)),
  the EMA then differs clearly from the model), then utils.save_checkpoint to
  import_torch_<tag>.pth: {'optimizer', 'model', 'ema': {decay, num_updates, shadow_params},
  'step'}. The EMA keeps shadow parameters for the trainable parameters only, so for NCSN++
  with Fourier features the list is one shorter than the parameter list (W has
  requires_grad=False). The parameters are perturbed before training so that zero-initialized
  layers matter. Inputs x [B, H, W, C], labels and the outputs of the model and of the EMA
  (applied by the reference's ema.copy_to) go to import_torch_<tag>.npz. Adaptations:
  score_sde_pytorch's NCSNv2 pads its dilated 3x3 convs by 1, which cannot run; they are
  padded by the dilation here (ermongroup/ncsnv2's convs), as models/ncsnv2.py does. Its `op`
  package's CUDA build is skipped on a CPU machine, and TensorFlow, which its utils.py imports
  for restore_checkpoint only, is stubbed. (The fixtures were made with torch 2.14.1 on a CPU:
  the PyPI wheel installed with --no-deps in a venv, its CUDA libraries, which it needs to
  import, replaced by empty stand-in libraries since no CUDA code runs.)

Flax fixtures (yang-song/score_sde; run with this repository's Python):

  python scripts/make_import_fixtures.py flax --reference_dir /path/to/score_sde/checkout

  The reference's Flax networks and its training step (losses.get_step_fn: the loss,
  gradient clipping, Adam through state.optimizer.apply_gradient, and the EMA update
  params_ema <- ema_rate params_ema + (1 - ema_rate) params over the whole parameter tree)
  run on current JAX/Flax with shims made here: flax.optim, removed from Flax, is replaced
  by an Adam with flax.optim.Adam's update and serialized layout; jax.tree_multimap /
  tree_map / tree_leaves, removed from JAX, are aliases of jax.tree_util's; TensorFlow (file
  I/O only) is stubbed. The step's pmean runs under a vmap of size 1 (one device). After
  STEP steps (lr LR, no warm-up) the State (step, optimizer {target, state {step,
  param_states}}, lr, model_state, ema_rate, params_ema, rng) is written as flax msgpack,
  as flax.training.checkpoints does, to import_flax_<tag>.msgpack, with inputs and outputs
  in import_flax_<tag>.npz. The Fourier W gets no gradient (stop_gradient), so it is equal
  in the target and params_ema; every other leaf differs.

Tiny sizes: 16x16 images, nf 4, ch_mult (1, 2), one residual block, attention at 8x8;
NCSNv2 nf 4, 5 noise scales; DDPM (32 GroupNorm groups at every width, as the reference)
nf 32, ch_mult (1,), 8x8. NCSNv2 and DDPM store every floating tensor in float16 (outputs
computed from the rounded weights), and the DDPM files leave out the optimizer's moments,
which the importer never reads (see TORCH_CASES); about 3 MB in all.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), 'tests', 'fixtures')

SMALL = dict(image_size=16, nf=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
DDPM_SMALL = dict(image_size=8, nf=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,))
# tag: (config module, model overrides, label kind, stored in float16, Adam moments stored).
# NCSNv2 and the DDPM (32 channels at least) store every floating tensor in float16 and
# their reference outputs are computed from the float16-rounded weights; the DDPM's file
# leaves out the optimizer's moments (an empty optimizer 'state'), which the importer never
# reads. Both keep the files small.
TORCH_CASES = {
    've_ncsnpp_continuous': ('configs.ve.cifar10_ncsnpp_continuous', SMALL, 'sigma', False,
                             True),
    'vp_ddpmpp_continuous': ('configs.vp.cifar10_ddpmpp_continuous', SMALL, 'time999', False,
                             True),
    'vp_ddpm': ('configs.vp.ddpm.cifar10', DDPM_SMALL, 'index', True, False),
    've_ncsnv2': ('configs.ve.ncsnv2.cifar10', dict(image_size=16, nf=4, num_scales=5),
                  'index', True, True),
}
FLAX_CASES = {k: TORCH_CASES[k] for k in ('ve_ncsnpp_continuous', 'vp_ddpm')}
BATCH = 3
STEP = 7   # training steps taken before saving
LR = 1e-2   # large, so that after STEP steps the EMA differs clearly from the model


def _config(module_name, overrides):
  import importlib
  config = importlib.import_module(module_name).get_config()
  for key, value in overrides.items():
    if key == 'image_size':
      config.data.image_size = value
    else:
      setattr(config.model, key, value)
  config.data.channels = config.data.num_channels   # the reference's NCSNv2 reads this name
  return config


def _labels(kind, config, rng):
  if kind == 'sigma':
    return np.exp(rng.uniform(np.log(0.01), np.log(50.), BATCH)).astype(np.float32)
  if kind == 'time999':
    return (999 * rng.uniform(0.01, 1., BATCH)).astype(np.float32)
  return rng.integers(0, config.model.num_scales, BATCH).astype(np.int64)


def _meta(module_name, overrides, kind):
  return json.dumps({'config': module_name, 'overrides': overrides, 'labels': kind})


def _stub_tensorflow():
  """The reference's utils.py and models/utils.py import TensorFlow for file I/O only."""
  import importlib.machinery
  import types
  tf = types.ModuleType('tensorflow')
  tf.__spec__ = importlib.machinery.ModuleSpec('tensorflow', None)
  tf.io = types.SimpleNamespace(gfile=None)
  sys.modules['tensorflow'] = tf


def _reference_sde(config, sde_lib):
  """The SDE the reference's run_lib.train builds for config.training.sde."""
  name, m = config.training.sde.lower(), config.model
  if name == 'vesde':
    return sde_lib.VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)
  cls = {'vpsde': sde_lib.VPSDE, 'subvpsde': sde_lib.subVPSDE}[name]
  return cls(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)


def _train_batch(config, rng):
  x = rng.uniform(size=(BATCH, config.data.image_size, config.data.image_size,
                        config.data.num_channels)).astype(np.float32)
  return 2 * x - 1 if config.data.centered else x   # the reference's data scaler


def make_torch(reference_dir):
  import torch
  import torch.utils.cpp_extension
  if not torch.cuda.is_available():
    torch.utils.cpp_extension.load = lambda *a, **k: None   # the `op` package's CUDA build
  _stub_tensorflow()
  sys.path.insert(0, reference_dir)
  import losses
  import sde_lib
  from models import layers, ddpm, ncsnpp, ncsnv2  # noqa: F401  (registers the models)
  from models import utils as mutils
  from models.ema import ExponentialMovingAverage
  from utils import save_checkpoint

  def dilated_conv3x3(in_planes, out_planes, stride=1, bias=True, dilation=1, init_scale=1.,
                      padding=1):
    del init_scale, padding
    return torch.nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, bias=bias,
                           dilation=dilation, padding=dilation)
  layers.ncsn_conv3x3 = dilated_conv3x3

  for tag, (module_name, overrides, kind, half, moments) in TORCH_CASES.items():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = _config(module_name, overrides)
    config.device = torch.device('cpu')
    config.optim.lr, config.optim.warmup = LR, 0
    # run_lib.train's set-up: DataParallel model, EMA over model.parameters(), Adam.
    model = mutils.create_model(config)
    with torch.no_grad():   # so that zero-initialized layers matter
      for p in model.parameters():
        if p.requires_grad:
          p.add_(0.05 * torch.randn_like(p))
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    optimizer = losses.get_optimizer(config, model.parameters())
    state = dict(optimizer=optimizer, model=model, ema=ema, step=0)
    train_step = losses.get_step_fn(
        _reference_sde(config, sde_lib), train=True,
        optimize_fn=losses.optimization_manager(config),
        reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
        likelihood_weighting=config.training.likelihood_weighting)
    for _ in range(STEP):
      batch = torch.from_numpy(_train_batch(config, rng)).permute(0, 3, 1, 2)
      train_step(state, batch)
    if half:   # outputs from the float16-rounded weights that are stored
      with torch.no_grad():
        for t in list(model.parameters()) + ema.shadow_params:
          t.copy_(t.half().float())
    x = rng.uniform(size=(BATCH, config.data.image_size, config.data.image_size,
                          config.data.num_channels)).astype(np.float32)
    labels = _labels(kind, config, rng)
    model.eval()
    with torch.no_grad():
      xt, lt = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(labels)
      out = model(xt, lt).permute(0, 2, 3, 1).numpy()
      ema.store(model.parameters())
      ema.copy_to(model.parameters())
      out_ema = model(xt, lt).permute(0, 2, 3, 1).numpy()
      ema.restore(model.parameters())
    if half:
      model.half()
      ema.shadow_params = [s.half() for s in ema.shadow_params]
      for adam in optimizer.state.values():
        for name in ('exp_avg', 'exp_avg_sq'):
          adam[name] = adam[name].half()
    if not moments:
      optimizer.state.clear()
    save_checkpoint(os.path.join(OUT, f'import_torch_{tag}.pth'), state)
    np.savez(os.path.join(OUT, f'import_torch_{tag}.npz'), x=x, labels=labels, out=out,
             out_ema=out_ema, meta=_meta(module_name, overrides, kind))
    n_trained = sum(p.requires_grad for p in model.parameters())
    print(tag, sum(p.numel() for p in model.parameters()), 'parameters,',
          len(ema.shadow_params), 'EMA entries for', n_trained, 'trainable of',
          len(list(model.parameters())), 'tensors; step', state['step'])


def _flax_adam(config):
  """flax.optim.Adam, removed from Flax since: the reference's step calls
  `state.optimizer.apply_gradient(grad, learning_rate=lr)` and reads `.target`."""
  import flax.struct
  import jax
  import jax.numpy as jnp
  b1, b2, eps, wd = config.optim.beta1, 0.999, config.optim.eps, config.optim.weight_decay

  @flax.struct.dataclass
  class Adam:
    target: object
    step: object
    grad_ema: object
    grad_sq_ema: object

    @classmethod
    def create(cls, params):
      zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
      return cls(params, jnp.zeros((), jnp.int32), zeros, zeros)

    def apply_gradient(self, grad, learning_rate):
      t = self.step + 1
      m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, self.grad_ema, grad)
      v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, self.grad_sq_ema, grad)
      def update(p, m, v):
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        return p - learning_rate * (m_hat / (jnp.sqrt(v_hat) + eps) + wd * p)
      return Adam(jax.tree_util.tree_map(update, self.target, m, v), t, m, v)

    def state_dict(self, moments):
      """flax.optim's serialized Optimizer: {'target', 'state': {'step', 'param_states'}}."""
      state = {'step': self.step}
      if moments:
        state['param_states'] = jax.tree_util.tree_map(
            lambda m, v: {'grad_ema': m, 'grad_sq_ema': v}, self.grad_ema, self.grad_sq_ema)
      return {'target': self.target, 'state': state}

  return Adam


def make_flax(reference_dir):
  import types
  import flax.training.checkpoints  # noqa: F401  (before the TensorFlow stub)
  _stub_tensorflow()
  import flax
  import jax
  import jax.numpy as jnp
  if not hasattr(flax, 'optim'):
    flax.optim = types.SimpleNamespace(Optimizer=object)
  for old, new in (('tree_multimap', jax.tree_util.tree_map), ('tree_map', jax.tree_util.tree_map),
                   ('tree_leaves', jax.tree_util.tree_leaves)):
    if not hasattr(jax, old):   # removed from JAX since; the reference's step uses them
      setattr(jax, old, new)
  sys.path.insert(0, reference_dir)
  import losses
  import sde_lib
  from flax import serialization
  from models import ddpm, ncsnpp  # noqa: F401  (registers the models)
  from models import utils as mutils

  for tag, (module_name, overrides, kind, half, moments) in FLAX_CASES.items():
    rng = np.random.default_rng(0)
    config = _config(module_name, overrides)
    config.optim.lr, config.optim.warmup = LR, 0
    model = mutils.get_model(config.model.name)(config=config)
    x = rng.uniform(size=(BATCH, config.data.image_size, config.data.image_size,
                          config.data.num_channels)).astype(np.float32)
    labels = _labels(kind, config, rng)
    variables = model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
                           jnp.asarray(x), jnp.asarray(labels), train=False)
    variables = dict(variables)
    params = jax.tree_util.tree_map(   # so that zero-initialized layers matter
        lambda a: a + 0.05 * jnp.asarray(rng.standard_normal(a.shape), a.dtype),
        variables.pop('params'))
    Adam = _flax_adam(config)
    # run_lib.train's State; EMA starts as the initial parameters.
    state = mutils.State(step=0, optimizer=Adam.create(params), lr=config.optim.lr,
                         model_state=variables, ema_rate=config.model.ema_rate,
                         params_ema=params, rng=jax.random.PRNGKey(1))
    step_fn = losses.get_step_fn(
        _reference_sde(config, sde_lib), model, train=True,
        optimize_fn=losses.optimization_manager(config),
        reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
        likelihood_weighting=config.training.likelihood_weighting)
    # One device: the step's pmean over axis 'batch' runs under a vmap of size 1.
    p_step = jax.jit(jax.vmap(step_fn, axis_name='batch'))
    add_axis = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], tree)
    carry = add_axis((jax.random.PRNGKey(2), state))
    for _ in range(STEP):
      carry, _ = p_step(carry, add_axis({'image': jnp.asarray(_train_batch(config, rng))}))
    state = jax.tree_util.tree_map(lambda a: a[0], carry[1])
    dtype = np.float16 if half else np.float32
    store = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dtype), tree)
    params, params_ema = store(state.optimizer.target), store(state.params_ema)

    def apply(p):
      p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
      return np.asarray(model.apply({'params': p}, jnp.asarray(x), jnp.asarray(labels),
                                    train=False))
    out, out_ema = apply(params), apply(params_ema)
    adam = state.optimizer
    optimizer = adam.replace(target=params, grad_ema=store(adam.grad_ema),
                             grad_sq_ema=store(adam.grad_sq_ema)).state_dict(moments)
    saved = {'step': state.step, 'optimizer': optimizer, 'lr': state.lr,
             'model_state': state.model_state, 'ema_rate': state.ema_rate,
             'params_ema': params_ema, 'rng': state.rng}
    saved = jax.tree_util.tree_map(np.asarray, saved)
    with open(os.path.join(OUT, f'import_flax_{tag}.msgpack'), 'wb') as f:
      f.write(serialization.msgpack_serialize(saved))
    np.savez(os.path.join(OUT, f'import_flax_{tag}.npz'), x=x, labels=labels, out=out,
             out_ema=out_ema, meta=_meta(module_name, overrides, kind))
    w = params.get('GaussianFourierProjection_0', {}).get('W')
    print(tag, sum(a.size for a in jax.tree_util.tree_leaves(params)), 'parameters; step',
          int(state.step), '; Fourier W equal in params_ema:',
          None if w is None else bool(np.array_equal(
              w, params_ema['GaussianFourierProjection_0']['W'])))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('kind', choices=('torch', 'flax'))
  parser.add_argument('--reference_dir', required=True)
  args = parser.parse_args()
  os.makedirs(OUT, exist_ok=True)
  # The reference's configs, not ours: its directory goes first on the path.
  (make_torch if args.kind == 'torch' else make_flax)(os.path.abspath(args.reference_dir))


if __name__ == '__main__':
  main()
