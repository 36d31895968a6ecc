"""Import the released score_sde checkpoints (PyTorch .pth or Flax msgpack) into ours.

    python checkpoint_import.py --config configs/ve/cifar10_ncsnpp_continuous.py \\
        --checkpoint checkpoint_24.pth --workdir runs/ve_ncsnpp_imported

writes a training state (step, parameters, EMA parameters, a fresh optimizer state) to
WORKDIR/checkpoints/snapshots/STEP, so that `main.py --mode sample|eval|train` on that
workdir samples, evaluates or fine-tunes the imported model. The config must be the one
the checkpoint was trained with (the same architecture hyperparameters); any mismatch of
names or shapes is an error that names the parameter.

Sources:
  * score_sde_pytorch (`torch.save` of {'model': state_dict, 'ema': {'shadow_params': [...]},
    'optimizer', 'step'}; the model state dict of a DataParallel-wrapped network, keys
    'module.*'). Read without torch: a .pth is a zip of raw tensor storages and a pickle,
    and the pickle is read with an unpickler that builds nothing but arrays and containers.
    NCSN++, DDPM++, DDPM, NCSNv2 and NCSN.
  * score_sde (Flax; `flax.training.checkpoints` msgpack of the State dataclass:
    'optimizer' {'target': params}, 'params_ema', 'step', ...). NCSN++, DDPM++ and DDPM.
    (Its NCSNv2 is a different network from the PyTorch one that ours follows.)

How names map. The PyTorch NCSN++ / DDPM keep their modules in a list used in forward
order ('all_modules.{i}'); ours names the same modules 'all_modules_{i}' (models/ncsnpp.py),
NCSNv2's names map by the rule in models/ncsnv2.py. The Flax reference names modules
automatically, '{Class}_{k}' per class in creation order, which is again forward order: the
k-th parameterized module of a class is our k-th module of that class. Leaf conventions:
torch conv weights [O, I, kh, kw] -> kernel [kh, kw, I, O]; torch Linear weights transposed;
the reference NIN's W / b and the Flax FIR conv's 'weight' -> kernel / bias.
"""
from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# -----------------------------------------------------------------------------
# Reading a torch.save file without torch.
# -----------------------------------------------------------------------------

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'BFloat16Storage': jnp.bfloat16,
}


class _Storage:
  def __init__(self, dtype):
    self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *unused):
  array = storage
  itemsize = array.dtype.itemsize
  if not size:
    return np.array(array[offset])
  view = np.lib.stride_tricks.as_strided(array[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Builds arrays and plain containers only; any other global is refused."""

  _ALLOWED = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('torch', 'device'): str,
  }

  def __init__(self, file, archive, prefix):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._cache = {}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _Storage(_STORAGE_DTYPES[name])
    if module == 'torch' and name == 'Size':
      return tuple
    raise pickle.UnpicklingError(
        f'{module}.{name} in the checkpoint is not a tensor or a plain container; refusing to '
        'build it (only state dicts, lists, numbers and tensors are read)')

  def persistent_load(self, pid):
    kind, storage_type, key, unused_location, numel = pid[:5]
    if kind != 'storage':
      raise pickle.UnpicklingError(f'unknown persistent id {pid!r}')
    dtype = storage_type.dtype if isinstance(storage_type, _Storage) else None
    if dtype is None:
      raise pickle.UnpicklingError(f'unknown storage type {storage_type!r}')
    if key not in self._cache:
      raw = self._archive.read(f'{self._prefix}data/{key}')
      self._cache[key] = np.frombuffer(raw, dtype=dtype, count=numel)
    return self._cache[key]


def read_torch_checkpoint(path: str) -> Any:
  """The object a `torch.save` zip file holds, tensors as numpy arrays (no torch needed)."""
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f'{path} is not a zip-format torch checkpoint (torch >= 1.6 writes those). Re-save it '
        'with a recent torch: torch.save(torch.load(path), path)')
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('data.pkl')]
    if len(pickles) != 1:
      raise ValueError(f'{path}: expected one data.pkl in the archive, found {pickles}')
    prefix = pickles[0][:-len('data.pkl')]
    order = archive.read(prefix + 'byteorder').decode() if prefix + 'byteorder' in \
        archive.namelist() else 'little'
    if order != 'little':
      raise ValueError(f'{path}: big-endian checkpoints are not supported')
    return _TorchUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix).load()


# -----------------------------------------------------------------------------
# Our parameter tree for a config, and its modules' classes.
# -----------------------------------------------------------------------------


def _model_and_inputs(config):
  import run_lib
  model = run_lib.make_model(config)
  shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
  return model, jnp.zeros(shape, jnp.float32), jnp.zeros((1,), jnp.float32)


def param_template(config) -> dict:
  """Our parameter tree for ``config.model`` as ShapeDtypeStructs (nothing is computed)."""
  model, x, labels = _model_and_inputs(config)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, labels)['params']


def _top_level_classes(config) -> dict:
  """name -> class name of each module directly under the root of our network."""
  import flax.linen as nn
  model, x, labels = _model_and_inputs(config)
  classes = {}

  def record(next_fun, args, kwargs, context):
    path = context.module.scope.path if context.module.scope is not None else ()
    if len(path) == 1:
      classes.setdefault(path[0], type(context.module).__name__)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x, labels)
  return classes


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat):
  tree = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _fill(template, assigned: dict, source: str) -> dict:
  """Checks ``assigned`` (path -> array) covers ``template`` exactly with equal shapes."""
  want = _flatten(template)
  missing = [('/'.join(p)) for p in want if p not in assigned]
  extra = [('/'.join(p)) for p in assigned if p not in want]
  if missing or extra:
    raise ValueError(
        f'{source} does not fit this config\'s network: {len(missing)} of our parameters have '
        f'no counterpart (first: {missing[:5]}) and {len(extra)} of its have none here (first: '
        f'{extra[:5]}). Is the config the one the checkpoint was trained with?')
  out = {}
  for path, spec in want.items():
    value = np.asarray(assigned[path])
    if value.shape != tuple(spec.shape):
      raise ValueError(f'{source}: parameter {"/".join(path)} has shape {value.shape} there and '
                       f'{tuple(spec.shape)} in this config\'s network')
    out[path] = jnp.asarray(value, spec.dtype)
  return _unflatten(out)


# -----------------------------------------------------------------------------
# PyTorch state dicts.
# -----------------------------------------------------------------------------

_BUFFERS = ('sigmas',)
# NCSNv2_256 has one more level than the others; the reference names the extra blocks
# res31 / refine31 and shifts nothing, ours number them on.
_V2_256_RENAMES = {'res31': 'res4', 'res4': 'res5', 'res5': 'res6', 'refine31': 'refine3',
                   'refine3': 'refine4', 'refine4': 'refine5', 'refine5': 'refine6'}


def _torch_path(key: str, renames: Mapping[str, str]) -> list[str]:
  """'all_modules.3.Conv_0.weight' -> ['all_modules_3', 'Conv_0', 'weight']."""
  parts = []
  for p in key.split('.'):
    if p.isdigit() and parts:
      parts[-1] = f'{parts[-1]}_{p}'
    else:
      parts.append(renames.get(p, p) if not parts else p)
  return parts


def _torch_leaf(path, value, flat_template):
  """Our (path, array) for one torch tensor: renames the leaf and converts the layout."""
  *mods, leaf = path
  candidates = {'weight': ('kernel', 'scale', 'embedding'), 'bias': ('bias',),
                'W': ('W', 'kernel'), 'b': ('bias',)}.get(leaf, (leaf,))
  for name in candidates:
    ours = tuple(mods) + (name,)
    if ours in flat_template:
      break
  else:
    return tuple(path), value
  if name == 'kernel' and leaf == 'weight':
    value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  elif leaf in ('alpha', 'gamma', 'beta', 'scale', 'bias') and value.ndim > 1:
    value = value.reshape(-1)
  return ours, value


def params_from_torch_state_dict(state_dict: Mapping[str, np.ndarray], config,
                                 source: str = 'the state dict') -> dict:
  """Our parameters for ``config`` from a score_sde_pytorch model state dict."""
  template = param_template(config)
  flat_template = _flatten(template)
  renames = _V2_256_RENAMES if config.model.name == 'ncsnv2_256' else {}
  assigned = {}
  for key, value in state_dict.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    if key in _BUFFERS or key.endswith(('num_batches_tracked', 'running_mean', 'running_var')):
      continue
    path, array = _torch_leaf(_torch_path(key, renames), np.asarray(value), flat_template)
    if path in assigned:
      raise ValueError(f'{source}: two tensors map to {"/".join(path)}')
    assigned[path] = array
  return _fill(template, assigned, source)


def parameter_names(state_dict: Mapping[str, Any]) -> list[str]:
  """The state dict's keys in `module.parameters()` order (buffers dropped)."""
  out = []
  for key in state_dict:
    bare = key[len('module.'):] if key.startswith('module.') else key
    if bare in _BUFFERS or bare.endswith(('num_batches_tracked', 'running_mean', 'running_var')):
      continue
    out.append(key)
  return out


def import_torch_checkpoint(path: str, config) -> dict:
  """{'step', 'params', 'ema_params'} from a score_sde_pytorch .pth checkpoint."""
  ckpt = read_torch_checkpoint(path)
  if not isinstance(ckpt, Mapping) or 'model' not in ckpt:
    keys = list(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise ValueError(f'{path}: expected a dict with a "model" state dict (score_sde_pytorch\'s '
                     f'save_checkpoint); found {keys}')
  model_sd = ckpt['model']
  params = params_from_torch_state_dict(model_sd, config, f'{path} ["model"]')
  ema_params = params
  if 'ema' in ckpt:
    shadow = ckpt['ema']['shadow_params']
    names = parameter_names(model_sd)
    if len(shadow) != len(names):
      raise ValueError(f'{path}: {len(shadow)} EMA shadow parameters for {len(names)} model '
                       'parameters')
    for name, s in zip(names, shadow):
      if tuple(np.shape(s)) != tuple(np.shape(model_sd[name])):
        raise ValueError(f'{path}: EMA parameter for {name} has shape {np.shape(s)}, the model\'s '
                         f'{np.shape(model_sd[name])}')
    ema_params = params_from_torch_state_dict(dict(zip(names, shadow)), config,
                                              f'{path} ["ema"]')
  step = int(np.asarray(ckpt.get('step', 0)))
  return {'step': step, 'params': params, 'ema_params': ema_params}


# -----------------------------------------------------------------------------
# Flax (score_sde) parameter trees.
# -----------------------------------------------------------------------------

_FLAX_LEAF_RENAMES = {'W': 'kernel', 'b': 'bias', 'weight': 'kernel'}
_FLAX_MODELS = ('ncsnpp', 'ddpm')


def _class_kind(name: str) -> str:
  """Reference and our class names to one kind: 'ResnetBlockBigGANpp' ~ 'ResnetBlockBigGAN'."""
  return name[:-2] if name.endswith('pp') else name


def params_from_flax_tree(ref_params: Mapping, config, source: str = 'the Flax tree') -> dict:
  """Our parameters for ``config`` from a score_sde (Flax) parameter tree."""
  if config.model.name not in _FLAX_MODELS:
    raise ValueError(f'Flax checkpoints import for model.name in {_FLAX_MODELS}; got '
                     f'{config.model.name!r} (score_sde\'s Flax NCSNv2 is another network: '
                     'import the PyTorch checkpoint)')
  template = param_template(config)
  flat_template = _flatten(template)
  ours_by_kind = collections.defaultdict(list)
  for name, cls in sorted(_top_level_classes(config).items(),
                          key=lambda kv: int(kv[0].rsplit('_', 1)[1])):
    if name in template:
      ours_by_kind[_class_kind(cls)].append(name)
  theirs_by_kind = collections.defaultdict(list)
  for name, sub in ref_params.items():
    match = re.fullmatch(r'(.+)_(\d+)', name)
    if match is None:
      raise ValueError(f'{source}: unexpected top-level module name {name!r}')
    if isinstance(sub, Mapping) and not _flatten(sub):
      continue   # a module without parameters (e.g. a pyramid resampler)
    theirs_by_kind[_class_kind(match.group(1))].append((int(match.group(2)), name))
  assigned = {}
  for kind in sorted(set(ours_by_kind) | set(theirs_by_kind)):
    ours, theirs = ours_by_kind.get(kind, []), [n for _, n in sorted(theirs_by_kind.get(kind, []))]
    if len(ours) != len(theirs):
      raise ValueError(f'{source}: {len(theirs)} {kind} modules with parameters there, '
                       f'{len(ours)} in this config\'s network. Is the config the one the '
                       'checkpoint was trained with?')
    for our_name, their_name in zip(ours, theirs):
      for sub_path, value in _flatten(ref_params[their_name]).items():
        *mods, leaf = sub_path
        path = (our_name, *mods, leaf)
        if path not in flat_template and leaf in _FLAX_LEAF_RENAMES:
          path = (our_name, *mods, _FLAX_LEAF_RENAMES[leaf])
        assigned[path] = np.asarray(value)
  return _fill(template, assigned, source)


def import_flax_checkpoint(path: str, config) -> dict:
  """{'step', 'params', 'ema_params'} from a score_sde `checkpoint_N` msgpack file."""
  from flax import serialization
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    state = serialization.msgpack_restore(raw)
  except Exception as e:   # msgpack raises several types for foreign bytes
    raise ValueError(f'{path} is neither a PyTorch .zip checkpoint nor a Flax msgpack one '
                     f'({type(e).__name__}: {e})') from e
  if not isinstance(state, Mapping) or 'optimizer' not in state:
    keys = list(state) if isinstance(state, Mapping) else type(state).__name__
    raise ValueError(f'{path}: expected score_sde\'s State (keys step, optimizer, params_ema, '
                     f'...); found {keys}')

  def unwrap(tree):
    return tree['params'] if set(tree) == {'params'} else tree

  params = params_from_flax_tree(unwrap(state['optimizer']['target']), config,
                                 f'{path} [optimizer.target]')
  ema_params = params
  if 'params_ema' in state:
    ema_params = params_from_flax_tree(unwrap(state['params_ema']), config, f'{path} [params_ema]')
  return {'step': int(np.asarray(state.get('step', 0))), 'params': params,
          'ema_params': ema_params}


def import_checkpoint(path: str, config) -> dict:
  """Either kind of file, told apart by its content (a zip is PyTorch)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--checkpoint {path}: no such file')
  if zipfile.is_zipfile(path):
    return import_torch_checkpoint(path, config)
  return import_flax_checkpoint(path, config)


def write_workdir(config, imported: dict, workdir: str) -> str:
  """Saves the imported state as our checkpoint at its step; returns its directory."""
  import run_lib
  comp = run_lib.build_components(
      config, (config.data.image_size, config.data.image_size, config.data.num_channels))
  params = {'params': imported['params']}
  state = run_lib.TrainState(jnp.asarray(imported['step'], jnp.int32), params,
                             {'params': imported['ema_params']}, comp.optimizer.init(params))
  ckpts = run_lib.Checkpoints(workdir, config.training.snapshot_keep)
  ckpts.save(ckpts.snapshots, imported['step'], state)
  ckpts.wait()
  ckpts.close()
  return os.path.join(os.path.abspath(workdir), 'checkpoints', 'snapshots', str(imported['step']))


def main(argv):
  del argv
  from absl import logging
  config = FLAGS.config
  import run_lib
  run_lib.validate_config(config, num_devices=1)
  imported = import_checkpoint(FLAGS.checkpoint, config)
  where = write_workdir(config, imported, FLAGS.workdir)
  logging.info('Imported %s (step %d) into %s', FLAGS.checkpoint, imported['step'], where)
  print(f'imported step {imported["step"]} -> {where}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file('config', None, 'The config the checkpoint was trained with.',
                                  lock_config=True)
  flags.DEFINE_string('checkpoint', None, 'A score_sde_pytorch .pth or a score_sde checkpoint_N.')
  flags.DEFINE_string('workdir', None, 'Where to write our checkpoint.')
  flags.mark_flags_as_required(['config', 'checkpoint', 'workdir'])
  app.run(main)
