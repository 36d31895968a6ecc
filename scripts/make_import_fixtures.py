#!/usr/bin/env python
"""Makes tests/fixtures/import_*: tiny reference checkpoints and the reference's outputs.

The checkpoint-import tests (tests/test_checkpoint_import.py) convert these files with
checkpoint_import.py and compare our network's outputs with the ones the reference code
computed here. Nothing of the reference is copied: this script imports it from a local
clone given on the command line and writes only weights, inputs and outputs.

PyTorch fixtures (score_sde_pytorch; run with a Python that has torch):

  python scripts/make_import_fixtures.py torch --reference_dir /path/to/score_sde_pytorch

  For each tiny config: the reference network with its parameters perturbed (so zero-
  initialized layers matter), saved as score_sde_pytorch's save_checkpoint does (model state
  dict of the DataParallel wrapper, 'module.*' keys; EMA shadow parameters, here different
  from the model's; an optimizer state; the step) to import_torch_<tag>.pth, and inputs x
  [B, H, W, C], labels and the outputs of both the model and the EMA parameters to
  import_torch_<tag>.npz. score_sde_pytorch's NCSNv2 pads its dilated 3x3 convs by 1,
  which cannot run; they are padded by the dilation here (ermongroup/ncsnv2's convs),
  as models/ncsnv2.py does. Its `op` package's CUDA build is skipped on a CPU machine.

Flax fixtures (yang-song/score_sde; run with this repository's Python):

  python scripts/make_import_fixtures.py flax --reference_dir /path/to/score_sde

  The reference's Flax networks run on current Flax once the reference's
  `flax.optim.Optimizer` annotation (models/utils.py) is gone; this script replaces the
  missing module before importing and stubs TensorFlow, which the networks do not use. A
  State-shaped dict (step, optimizer {target, state}, lr, model_state, ema_rate, params_ema,
  rng) is written as flax msgpack, as flax.training.checkpoints does, to
  import_flax_<tag>.msgpack, with inputs and outputs in import_flax_<tag>.npz.

Tiny sizes: 16x16 images, nf 4, ch_mult (1, 2), one residual block, attention at 8x8;
DDPM (32 GroupNorm groups at every width, as the reference) nf 32, ch_mult (1,), 8x8,
its weights stored in float16 (outputs computed from the rounded weights).
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
# tag: (config module, model overrides, label kind, weights stored in float16). The DDPM
# (32 channels at least) is stored in float16 with its EMA equal to the model, to keep the
# file small; its reference outputs are computed from the float16-rounded weights.
TORCH_CASES = {
    've_ncsnpp_continuous': ('configs.ve.cifar10_ncsnpp_continuous', SMALL, 'sigma', False),
    'vp_ddpmpp_continuous': ('configs.vp.cifar10_ddpmpp_continuous', SMALL, 'time999', False),
    'vp_ddpm': ('configs.vp.ddpm.cifar10', DDPM_SMALL, 'index', True),
    've_ncsnv2': ('configs.ve.ncsnv2.cifar10', dict(image_size=16, nf=4, num_scales=5),
                  'index', False),
}
FLAX_CASES = {k: TORCH_CASES[k] for k in ('ve_ncsnpp_continuous', 'vp_ddpm')}
BATCH = 3
STEP = 7


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


def make_torch(reference_dir):
  import torch
  import torch.utils.cpp_extension
  if not torch.cuda.is_available():
    torch.utils.cpp_extension.load = lambda *a, **k: None   # the `op` package's CUDA build
  sys.path.insert(0, reference_dir)
  from models import layers, ddpm, ncsnpp, ncsnv2  # noqa: F401  (registers the models)
  from models import utils as mutils

  def dilated_conv3x3(in_planes, out_planes, stride=1, bias=True, dilation=1, init_scale=1.,
                      padding=1):
    del init_scale, padding
    return torch.nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, bias=bias,
                           dilation=dilation, padding=dilation)
  layers.ncsn_conv3x3 = dilated_conv3x3

  for tag, (module_name, overrides, kind, half) in TORCH_CASES.items():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = _config(module_name, overrides)
    config.device = torch.device('cpu')
    model = mutils.get_model(config.model.name)(config)
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
        if half:
          p.copy_(p.half().float())
    wrapped = torch.nn.DataParallel(model)
    if half:
      shadow = [p.detach() for p in model.parameters()]
    else:
      shadow = [p.detach().clone() + 0.02 * torch.randn_like(p) for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    x = rng.uniform(size=(BATCH, config.data.image_size, config.data.image_size,
                          config.data.num_channels)).astype(np.float32)
    labels = _labels(kind, config, rng)
    model.eval()
    with torch.no_grad():
      xt = torch.from_numpy(x).permute(0, 3, 1, 2)
      out = model(xt, torch.from_numpy(labels)).permute(0, 2, 3, 1).numpy()
      saved = [p.detach().clone() for p in model.parameters()]
      for p, s in zip(model.parameters(), shadow):
        p.copy_(s)
      out_ema = model(xt, torch.from_numpy(labels)).permute(0, 2, 3, 1).numpy()
      for p, s in zip(model.parameters(), saved):
        p.copy_(s)
    state_dict = wrapped.state_dict()
    if half:
      state_dict = type(state_dict)((k, v.half()) for k, v in state_dict.items())
      shadow = [state_dict['module.' + k] for k, _ in model.named_parameters()]
    torch.save({'optimizer': optimizer.state_dict(), 'model': state_dict,
                'ema': {'decay': 0.999, 'num_updates': STEP, 'shadow_params': shadow},
                'step': STEP}, os.path.join(OUT, f'import_torch_{tag}.pth'))
    np.savez(os.path.join(OUT, f'import_torch_{tag}.npz'), x=x, labels=labels, out=out,
             out_ema=out_ema, meta=_meta(module_name, overrides, kind))
    print(tag, sum(p.numel() for p in model.parameters()), 'parameters')


def make_flax(reference_dir):
  import importlib.machinery
  import types
  import flax.training.checkpoints  # noqa: F401  (before the TensorFlow stub)
  tf = types.ModuleType('tensorflow')
  tf.__spec__ = importlib.machinery.ModuleSpec('tensorflow', None)
  tf.io = types.SimpleNamespace(gfile=None)
  sys.modules['tensorflow'] = tf
  import flax
  if not hasattr(flax, 'optim'):
    flax.optim = types.SimpleNamespace(Optimizer=object)
  sys.path.insert(0, reference_dir)
  import jax
  import jax.numpy as jnp
  from flax import serialization
  from models import ddpm, ncsnpp  # noqa: F401  (registers the models)
  from models import utils as mutils

  for tag, (module_name, overrides, kind, half) in FLAX_CASES.items():
    rng = np.random.default_rng(0)
    config = _config(module_name, overrides)
    model = mutils.get_model(config.model.name)(config=config)
    x = rng.uniform(size=(BATCH, config.data.image_size, config.data.image_size,
                          config.data.num_channels)).astype(np.float32)
    labels = _labels(kind, config, rng)
    variables = model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
                           jnp.asarray(x), jnp.asarray(labels), train=False)
    leaves, tree = jax.tree_util.tree_flatten(variables['params'])
    dtype = np.float16 if half else np.float32
    params = jax.tree_util.tree_unflatten(
        tree, [(np.asarray(a) + 0.05 * rng.standard_normal(a.shape)).astype(dtype)
               for a in leaves])
    ema = params if half else jax.tree_util.tree_unflatten(
        tree, [(a + 0.02 * rng.standard_normal(a.shape)).astype(dtype)
               for a in jax.tree_util.tree_leaves(params)])
    def apply(p):
      p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
      return np.asarray(model.apply({'params': p}, jnp.asarray(x), jnp.asarray(labels),
                                    train=False))
    out, out_ema = apply(params), apply(ema)
    state = {'step': STEP, 'optimizer': {'target': params, 'state': {'step': STEP}},
             'lr': 2e-4, 'model_state': {}, 'ema_rate': 0.999, 'params_ema': ema,
             'rng': np.zeros(2, np.uint32)}
    if half:
      del state['params_ema']   # equal to the target here; the importer then uses the target
    with open(os.path.join(OUT, f'import_flax_{tag}.msgpack'), 'wb') as f:
      f.write(serialization.msgpack_serialize(state))
    np.savez(os.path.join(OUT, f'import_flax_{tag}.npz'), x=x, labels=labels, out=out,
             out_ema=out_ema, meta=_meta(module_name, overrides, kind))
    print(tag, sum(a.size for a in leaves), 'parameters')


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
