"""Import the released score_sde checkpoints (PyTorch .pth or Flax msgpack) into ours.

    python checkpoint_import.py --config configs/ve/cifar10_ncsnpp_continuous.py \\
        --checkpoint checkpoint_24.pth --workdir runs/ve_ncsnpp_imported

writes a training state (step, parameters, EMA parameters, a fresh optimizer state) to
WORKDIR/checkpoints/snapshots/STEP, so that `main.py --mode sample|eval|train` on that
workdir samples, evaluates or fine-tunes the imported model. The config must be the one
the checkpoint was trained with (the same architecture hyperparameters); any mismatch of
names or shapes is an error that names the parameter.

Sources:
  * score_sde_pytorch (its utils.save_checkpoint: `torch.save` of {'optimizer', 'model':
    the state dict of the DataParallel-wrapped network, keys 'module.*', 'ema': {'decay',
    'num_updates', 'shadow_params'}, 'step'}). The EMA's shadow_params list only the
    trainable parameters, in model.parameters() order: NCSN++'s Fourier projection W is
    created with requires_grad=False, so the Fourier configs' files have one entry fewer;
    the EMA model takes W from the model, as the reference's copy_to does. Read without
    torch: a .pth is a zip of raw tensor storages and a pickle, and the pickle is run by a
    small interpreter that builds nothing but arrays and containers and checks every tensor
    view against its storage. NCSN++, DDPM++, DDPM, NCSNv2 and NCSN.
  * score_sde (Flax; `flax.training.checkpoints` msgpack of the State dataclass:
    'optimizer' {'target': params, 'state'}, 'params_ema', 'step', ...). Its EMA covers the
    whole parameter tree (W included, which stop_gradient keeps equal to the model's).
    NCSN++, DDPM++ and DDPM. (Its NCSNv2 is a different network from the PyTorch one that
    ours follows.)

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
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# -----------------------------------------------------------------------------
# Reading a torch.save file without torch.
#
# A .pth (torch >= 1.6) is a zip: ARCHIVE/data.pkl pickles the saved object, each tensor as
# a call torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) whose storage is
# a persistent id ('storage', torch.FloatStorage, KEY, location, numel) naming the raw
# little-endian buffer ARCHIVE/data/KEY. The pickle is not given to pickle.Unpickler: the
# interpreter below knows only the opcodes torch.save writes for containers, numbers,
# strings and tensors, calls nothing but the tensor rebuilders and OrderedDict, and checks
# every view against its buffer, so a crafted file can neither run code, nor set attributes
# (BUILD: only a state dict's _metadata, which is dropped), nor read memory outside the
# buffers it ships.
# -----------------------------------------------------------------------------

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'BFloat16Storage': jnp.bfloat16,
}
_ZIP_MAGIC = b'PK\x03\x04'


class _StorageType:
  """A storage type global of the pickle (torch.FloatStorage, ...)."""

  def __init__(self, name, dtype):
    self.name, self.dtype = name, np.dtype(dtype)


class _Storage:
  """The elements of one storage, read from ARCHIVE/data/KEY."""

  def __init__(self, key, array):
    self.key, self.array = key, array


class _Callable:
  """An allow-listed global, the only kind of object REDUCE calls."""

  def __init__(self, name, fn):
    self.name, self.fn = name, fn


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _describe(obj) -> str:
  return obj.name if isinstance(obj, (_Callable, _StorageType)) else type(obj).__name__


def _check_view(storage: _Storage, offset, size, stride):
  """Refuses a tensor view that would read outside its storage's elements.

  The view reads element offset + sum_i k_i stride_i for 0 <= k_i < size_i, so with
  non-negative strides its last element is offset + sum_i (size_i - 1) stride_i.
  """
  where = f'a tensor on storage data/{storage.key} ({storage.array.size} elements)'
  if not _is_int(offset) or offset < 0:
    raise pickle.UnpicklingError(f'{where}: storage offset {offset!r} is not an integer >= 0')
  if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
          and all(_is_int(v) for v in size + stride)):
    raise pickle.UnpicklingError(
        f'{where}: size {size!r} and stride {stride!r} are not integer tuples of one length')
  if any(v < 0 for v in size):
    raise pickle.UnpicklingError(f'{where}: negative size {size}')
  if any(v < 0 for v in stride):
    raise pickle.UnpicklingError(f'{where}: negative stride {stride} (refused)')
  count = int(np.prod(size, dtype=object))
  if count == 0:
    return
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.array.size:
    raise pickle.UnpicklingError(
        f'{where}: offset {offset}, size {size} and stride {stride} reach element {last}, '
        'past the end of the storage')
  if count > storage.array.size:
    raise pickle.UnpicklingError(
        f'{where}: size {size} has {count} elements, more than the storage (zero strides '
        'repeating elements are refused)')


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """A copy of the checked view of ``storage`` (torch._utils._rebuild_tensor_v2)."""
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(
        f'a tensor\'s storage is a {_describe(storage)}, not a storage of the archive')
  _check_view(storage, offset, size, stride)
  array = storage.array
  if 0 in size:
    return np.zeros(size, array.dtype)
  view = np.lib.stride_tricks.as_strided(
      array[offset:], shape=size, strides=tuple(s * array.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  if not isinstance(data, np.ndarray):
    raise pickle.UnpicklingError(f'a parameter wraps a {_describe(data)}, not a tensor')
  return data


_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch', 'Size'): tuple,
}


def _find_global(module, name):
  if (module, name) in _GLOBALS:
    return _Callable(f'{module}.{name}', _GLOBALS[(module, name)])
  if module == 'torch' and name in _STORAGE_DTYPES:
    return _StorageType(f'{module}.{name}', _STORAGE_DTYPES[name])
  raise pickle.UnpicklingError(
      f'{module}.{name} in the checkpoint is not a tensor rebuild or a plain container; '
      'refusing to build it (only state dicts, lists, numbers and tensors are read)')


class _TorchPickle:
  """Runs the opcodes of a torch.save pickle (protocols 2 to 5), decoded by pickletools.

  Builds None, booleans, numbers, strings, tuples, lists, dicts, OrderedDicts and tensors;
  any other opcode, global, call or attribute setting is an error naming it.
  """
  _CONSTANTS = {'NONE': None, 'NEWTRUE': True, 'NEWFALSE': False}
  _LITERALS = frozenset({'BININT', 'BININT1', 'BININT2', 'LONG1', 'LONG4', 'BINFLOAT',
                         'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8'})
  _EMPTY = {'EMPTY_DICT': dict, 'EMPTY_LIST': list, 'EMPTY_TUPLE': tuple}
  _TUPLES = {'TUPLE1': 1, 'TUPLE2': 2, 'TUPLE3': 3}
  _SKIP = frozenset({'PROTO', 'FRAME'})

  def __init__(self, load_storage):
    self.load_storage = load_storage
    self.stack, self.marks, self.memo = [], [], {}
    self.ops = {
        'MARK': lambda arg: self.marks.append(len(self.stack)),
        'TUPLE': lambda arg: self.stack.append(tuple(self._pop_mark())),
        'BINPUT': self._put, 'LONG_BINPUT': self._put,
        'MEMOIZE': lambda arg: self._put(len(self.memo)),
        'BINGET': self._get, 'LONG_BINGET': self._get,
        'APPEND': lambda arg: self._extend([self.stack.pop()]),
        'APPENDS': lambda arg: self._extend(self._pop_mark()),
        'SETITEM': lambda arg: self._set_items([self.stack.pop(-2), self.stack.pop()]),
        'SETITEMS': lambda arg: self._set_items(self._pop_mark()),
        'GLOBAL': lambda arg: self.stack.append(_find_global(*arg.split(' ', 1))),
        'STACK_GLOBAL': self._stack_global,
        'BINPERSID': lambda arg: self.stack.append(self.load_storage(self.stack.pop())),
        'REDUCE': self._reduce,
        'BUILD': self._build,
    }

  def load(self, data: bytes):
    pos, name = 0, 'start'
    try:
      for op, arg, pos in pickletools.genops(data):
        name = op.name
        if name == 'STOP':
          return self.stack.pop()
        self._step(name, arg)
    except (IndexError, KeyError, TypeError, ValueError) as e:
      raise pickle.UnpicklingError(f'malformed pickle at byte {pos} ({name}): {e}') from None
    raise pickle.UnpicklingError('the pickle ends without STOP')

  def _step(self, name, arg):
    if name in self._SKIP:
      return
    if name in self._CONSTANTS:
      self.stack.append(self._CONSTANTS[name])
    elif name in self._LITERALS:
      self.stack.append(arg)
    elif name in self._EMPTY:
      self.stack.append(self._EMPTY[name]())
    elif name in self._TUPLES:
      n = self._TUPLES[name]
      if len(self.stack) < n:
        raise IndexError(f'{name} on a stack of {len(self.stack)}')
      items = tuple(self.stack[-n:])
      del self.stack[-n:]
      self.stack.append(items)
    elif name in self.ops:
      self.ops[name](arg)
    else:
      raise pickle.UnpicklingError(
          f'pickle opcode {name} is not one torch.save writes for tensors and containers; '
          'refusing it')

  def _pop_mark(self):
    start = self.marks.pop()
    items = self.stack[start:]
    del self.stack[start:]
    return items

  def _put(self, index):
    self.memo[index] = self.stack[-1]

  def _get(self, index):
    self.stack.append(self.memo[index])

  def _target(self, kind):
    target = self.stack[-1]
    if not isinstance(target, kind):
      raise pickle.UnpicklingError(f'items added to a {_describe(target)}, not a {kind.__name__}')
    return target

  def _extend(self, items):
    self._target(list).extend(items)

  def _set_items(self, flat):
    if len(flat) % 2:
      raise pickle.UnpicklingError(f'SETITEMS with {len(flat)} items, not key-value pairs')
    target = self._target(dict)
    for key, value in zip(flat[::2], flat[1::2]):
      target[key] = value

  def _stack_global(self, unused_arg):
    name, module = self.stack.pop(), self.stack.pop()
    if not (isinstance(module, str) and isinstance(name, str)):
      raise pickle.UnpicklingError(f'STACK_GLOBAL of {module!r}, {name!r}: not names')
    self.stack.append(_find_global(module, name))

  def _reduce(self, unused_arg):
    args, fn = self.stack.pop(), self.stack.pop()
    if not isinstance(fn, _Callable):
      raise pickle.UnpicklingError(f'REDUCE calls a {_describe(fn)}, which is not an '
                                   'allow-listed global')
    if not isinstance(args, tuple):
      raise pickle.UnpicklingError(f'REDUCE of {fn.name} with arguments {type(args).__name__}')
    self.stack.append(fn.fn(*args))

  def _build(self, unused_arg):
    """BUILD sets an object's state; torch.save uses it only for a state dict's _metadata
    (module versions), which is read and dropped. Anything else is refused."""
    state, target = self.stack.pop(), self.stack[-1]
    if not (type(target) is collections.OrderedDict and isinstance(state, dict)
            and set(state) <= {'_metadata'}):
      keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
      raise pickle.UnpicklingError(
          f'BUILD (setting state or attributes {keys}) on {_describe(target)} is refused: only '
          'a state dict\'s _metadata may be set')


def _storage_loader(archive: zipfile.ZipFile, prefix: str):
  """persistent_load for ('storage', type, key, location, numel): the checked buffer."""
  cache = {}

  def load(pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'persistent id {pid!r} is not a torch storage reference')
    _, storage_type, key, unused_location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'storage type {_describe(storage_type)} is not known')
    if not (isinstance(key, str) and _is_int(numel) and numel >= 0):
      raise pickle.UnpicklingError(f'storage key {key!r} / element count {numel!r} invalid')
    dtype = storage_type.dtype
    if key in cache:
      if cache[key].array.dtype != dtype or cache[key].array.size != numel:
        raise pickle.UnpicklingError(f'storage data/{key} is referenced with two types/sizes')
      return cache[key]
    name = f'{prefix}data/{key}'
    try:
      info = archive.getinfo(name)
    except KeyError:
      raise pickle.UnpicklingError(f'storage data/{key} is not in the archive') from None
    nbytes = numel * dtype.itemsize
    if info.file_size != nbytes:
      raise pickle.UnpicklingError(
          f'storage data/{key} holds {info.file_size} bytes; the pickle declares {numel} '
          f'elements of {dtype} ({nbytes} bytes)')
    cache[key] = _Storage(key, np.frombuffer(archive.read(name), dtype))
    return cache[key]

  return load


def _starts_as_zip(path: str) -> bool:
  with open(path, 'rb') as f:
    return f.read(4) == _ZIP_MAGIC


def read_torch_checkpoint(path: str) -> Any:
  """The object a `torch.save` zip file holds, tensors as numpy arrays (no torch needed).

  Raises:
    ValueError: the file is not a zip, or a truncated or damaged one.
    pickle.UnpicklingError: its pickle holds anything but containers, numbers, strings and
      tensors, or a tensor view outside its storage.
  """
  if not zipfile.is_zipfile(path):
    if _starts_as_zip(path):
      raise ValueError(f'{path} starts as a zip archive (a torch checkpoint) but has no zip '
                       'directory at its end: the file is truncated or damaged')
    raise ValueError(
        f'{path} is not a zip-format torch checkpoint (torch >= 1.6 writes those). Re-save it '
        'with a recent torch: torch.save(torch.load(path), path)')
  try:
    with zipfile.ZipFile(path) as archive:
      return _read_archive(archive, path)
  except (zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f'{path}: damaged zip archive ({e})') from None
  except pickle.UnpicklingError as e:
    raise pickle.UnpicklingError(f'{path}: {e}') from None


def _read_archive(archive: zipfile.ZipFile, path: str):
  pickles = [n for n in archive.namelist() if n.endswith('data.pkl')]
  if len(pickles) != 1:
    raise ValueError(f'{path}: expected one data.pkl in the archive, found {pickles}')
  prefix = pickles[0][:-len('data.pkl')]
  order = archive.read(prefix + 'byteorder').decode() if prefix + 'byteorder' in \
      archive.namelist() else 'little'
  if order != 'little':
    raise ValueError(f'{path}: big-endian checkpoints are not supported')
  return _TorchPickle(_storage_loader(archive, prefix)).load(archive.read(pickles[0]))


# -----------------------------------------------------------------------------
# Our parameter tree for a config, and its modules' classes.
# -----------------------------------------------------------------------------


def _model_and_inputs(config):
  import builder
  model = builder.make_model(config)
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
    key = _bare(key)
    if key in _BUFFERS or key.endswith(('num_batches_tracked', 'running_mean', 'running_var')):
      continue
    path, array = _torch_leaf(_torch_path(key, renames), np.asarray(value), flat_template)
    if path in assigned:
      raise ValueError(f'{source}: two tensors map to {"/".join(path)}')
    assigned[path] = array
  return _fill(template, assigned, source)


def _bare(key: str) -> str:
  return key[len('module.'):] if key.startswith('module.') else key


def parameter_names(state_dict: Mapping[str, Any]) -> list[str]:
  """The state dict's keys in `module.parameters()` order (buffers dropped)."""
  out = []
  for key in state_dict:
    bare = _bare(key)
    if bare in _BUFFERS or bare.endswith(('num_batches_tracked', 'running_mean', 'running_var')):
      continue
    out.append(key)
  return out


# Modules whose parameters the reference creates with requires_grad=False.
_UNTRAINED_MODULES = ('GaussianFourierProjection',)


def untrained_parameter_names(state_dict: Mapping[str, Any], config) -> list[str]:
  """The keys of ``state_dict`` the reference never trains (NCSN++'s Fourier projection W)."""
  modules = {name for name, cls in _top_level_classes(config).items()
             if cls in _UNTRAINED_MODULES}
  renames = _V2_256_RENAMES if config.model.name == 'ncsnv2_256' else {}
  return [key for key in parameter_names(state_dict)
          if _torch_path(_bare(key), renames)[0] in modules]


def ema_state_dict(ckpt: Mapping[str, Any], config, source: str) -> dict:
  """The model state dict of ``ckpt`` with its EMA shadow parameters in place.

  score_sde_pytorch's ExponentialMovingAverage (models/ema.py) keeps `shadow_params` for
  the parameters with requires_grad only, in model.parameters() order, and its copy_to
  leaves the others alone: the untrained ones (the Fourier W) are taken from the model.
  """
  model_sd, ema = ckpt['model'], ckpt['ema']
  if not (isinstance(ema, Mapping) and isinstance(ema.get('shadow_params'), (list, tuple))):
    found = sorted(ema) if isinstance(ema, Mapping) else type(ema).__name__
    raise ValueError(f'{source}: "ema" should be ExponentialMovingAverage.state_dict() '
                     f'(decay, num_updates, shadow_params); found {found}')
  shadow = ema['shadow_params']
  untrained = untrained_parameter_names(model_sd, config)
  trained = [k for k in parameter_names(model_sd) if k not in untrained]
  if len(shadow) != len(trained):
    raise ValueError(
        f'{source}: {len(shadow)} EMA shadow parameters, but the model has {len(trained)} '
        f'trainable parameters ({len(trained) + len(untrained)} less the untrained '
        f'{untrained}). Is the config the one the checkpoint was trained with?')
  out = dict(model_sd)
  for key, s in zip(trained, shadow):
    if np.shape(s) != np.shape(model_sd[key]):
      raise ValueError(f'{source}: EMA parameter for {key} has shape {np.shape(s)}, the '
                       f'model\'s {np.shape(model_sd[key])}')
    out[key] = s
  return out


def import_torch_checkpoint(path: str, config) -> dict:
  """{'step', 'params', 'ema_params'} from a score_sde_pytorch .pth checkpoint."""
  ckpt = read_torch_checkpoint(path)
  if not isinstance(ckpt, Mapping) or 'model' not in ckpt:
    keys = list(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise ValueError(f'{path}: expected a dict with a "model" state dict (score_sde_pytorch\'s '
                     f'save_checkpoint); found {keys}')
  params = params_from_torch_state_dict(ckpt['model'], config, f'{path} ["model"]')
  ema_params = params
  if 'ema' in ckpt:
    ema_params = params_from_torch_state_dict(ema_state_dict(ckpt, config, path), config,
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
  if zipfile.is_zipfile(path) or _starts_as_zip(path):
    return import_torch_checkpoint(path, config)
  return import_flax_checkpoint(path, config)


def _refuse_existing_step(workdir: str, step: int) -> str:
  """The snapshot directory an import of ``step`` writes; refused if it exists."""
  where = os.path.join(os.path.abspath(workdir), 'checkpoints', 'snapshots', str(step))
  if os.path.exists(where):
    raise FileExistsError(f'{where} exists: {workdir} already holds a snapshot at step {step}. '
                          'Import into another --workdir (or remove that directory to replace '
                          'it).')
  return where


def write_workdir(config, imported: dict, workdir: str) -> str:
  """Saves the imported state as our checkpoint at its step; returns its directory."""
  import builder
  import train_lib
  comp = builder.build_components(
      config, (config.data.image_size, config.data.image_size, config.data.num_channels))
  params = {'params': imported['params']}
  state = train_lib.TrainState(jnp.asarray(imported['step'], jnp.int32), params,
                             {'params': imported['ema_params']}, comp.optimizer.init(params))
  where = _refuse_existing_step(workdir, imported['step'])
  ckpts = train_lib.Checkpoints(workdir, config.training.snapshot_keep)
  ckpts.save(ckpts.snapshots, imported['step'], state)
  ckpts.wait()
  ckpts.close()
  return where


def import_into_workdir(config, checkpoint: str, workdir: str,
                        allow_config_change: bool = False) -> tuple[int, str]:
  """Reads and checks the whole checkpoint, then writes it; (step, directory written).

  Nothing is written unless every tensor was read and fits the config's network. The workdir
  records the config (workdir.py): one made with another model, SDE or data config is
  refused unless ``allow_config_change``; an existing snapshot at the same step is never
  replaced.
  """
  import workdir as workdir_lib
  imported = import_checkpoint(checkpoint, config)
  _refuse_existing_step(workdir, imported['step'])   # before the workdir's record can change
  with workdir_lib.claim(config, workdir, 'import', allow_config_change):
    return imported['step'], write_workdir(config, imported, workdir)


def main(argv):
  del argv
  import errors
  config = FLAGS.config
  import builder

  def run():
    builder.validate_config(config, num_devices=1)
    return import_into_workdir(config, FLAGS.checkpoint, FLAGS.workdir, FLAGS.allow_config_change)

  step, where = errors.run_reporting(run, FLAGS.verbose)
  print(f'imported step {step} -> {where}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file('config', None, 'The config the checkpoint was trained with.',
                                  lock_config=True)
  flags.DEFINE_string('checkpoint', None, 'A score_sde_pytorch .pth or a score_sde checkpoint_N.')
  flags.DEFINE_string('workdir', None, 'Where to write our checkpoint.')
  flags.DEFINE_bool('allow_config_change', False,
                    'Import into a workdir made with another model, SDE or data config.')
  flags.DEFINE_bool('verbose', False, 'Print the traceback of a user error.')
  flags.mark_flags_as_required(['config', 'checkpoint', 'workdir'])
  app.run(main)
