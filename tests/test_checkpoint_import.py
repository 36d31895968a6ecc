"""checkpoint_import: reference checkpoints (PyTorch .pth, Flax msgpack) reproduce the
reference's outputs in our networks, and crafted .pth files are refused.

The fixtures in tests/fixtures were made by scripts/make_import_fixtures.py (its docstring has
the commands) as the reference's training writes them: tiny reference networks trained a few
steps by the reference's own step function, with its EMA, saved by its save_checkpoint (PyTorch)
or as its State (Flax); the reference code computed `out` (model weights) and `out_ema` (EMA
weights) on the stored inputs. Tolerance: the largest absolute difference is at most 1e-4 of
the largest absolute reference output (float32); model and EMA outputs differ by far more.
"""
import json
import os
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import builder
import checkpoint_import
import eval_lib
import workdir

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
REL_TOL = 1e-4
TORCH_TAGS = ['ve_ncsnpp_continuous', 'vp_ddpmpp_continuous', 'vp_ddpm', 've_ncsnv2']
FLAX_TAGS = ['ve_ncsnpp_continuous', 'vp_ddpm']


def _fixture(kind, tag):
  data = np.load(os.path.join(FIXTURES, f'import_{kind}_{tag}.npz'))
  meta = json.loads(str(data['meta']))
  import importlib
  config = importlib.import_module(meta['config']).get_config()   # our config of that name
  for key, value in meta['overrides'].items():
    if key == 'image_size':
      config.data.image_size = value
    elif key == 'num_scales':     # the reference's config.model.num_scales is our sde's
      config.sde.num_scales = value
    else:
      setattr(config.model, key, tuple(value) if isinstance(value, list) else value)
  ext = 'pth' if kind == 'torch' else 'msgpack'
  return config, data, os.path.join(FIXTURES, f'import_{kind}_{tag}.{ext}')


def _apply(config, params, x, labels):
  model = builder.make_model(config)
  return np.asarray(jax.jit(model.apply)({'params': params}, jnp.asarray(x), jnp.asarray(labels)))


def _assert_close(ours, ref):
  assert ours.shape == ref.shape
  err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
  assert err < REL_TOL, err
  return err


@pytest.mark.parametrize('kind,tag', [('torch', t) for t in TORCH_TAGS] +
                         [('flax', t) for t in FLAX_TAGS])
def test_imported_checkpoint_reproduces_reference_outputs(kind, tag):
  config, data, path = _fixture(kind, tag)
  imported = checkpoint_import.import_checkpoint(path, config)
  assert imported['step'] == 7
  _assert_close(_apply(config, imported['params'], data['x'], data['labels']), data['out'])
  _assert_close(_apply(config, imported['ema_params'], data['x'], data['labels']),
                data['out_ema'])
  # The check tells the model from the EMA: their outputs differ by far more than REL_TOL.
  assert np.max(np.abs(data['out'] - data['out_ema'])) > 100 * REL_TOL * np.max(
      np.abs(data['out']))


def test_torch_reader_reads_save_checkpoint_layout():
  """score_sde_pytorch's save_checkpoint: EMA shadow parameters for the trainable parameters
  only (NCSN++'s Fourier W is not trainable), an Adam state with its scalar step tensors."""
  config, _, path = _fixture('torch', 've_ncsnpp_continuous')
  ckpt = checkpoint_import.read_torch_checkpoint(path)
  assert set(ckpt) == {'optimizer', 'model', 'ema', 'step'} and ckpt['step'] == 7
  assert all(k.startswith('module.') for k in ckpt['model'])
  w = ckpt['model']['module.all_modules.0.W']   # the Fourier projection, nf = 4
  assert w.dtype == np.float32 and w.shape == (4,)
  names = checkpoint_import.parameter_names(ckpt['model'])
  assert checkpoint_import.untrained_parameter_names(ckpt['model'], config) == [
      'module.all_modules.0.W']
  ema = ckpt['ema']
  assert (ema['decay'], ema['num_updates']) == (0.999, 7)
  assert len(ema['shadow_params']) == len(names) - 1
  adam = ckpt['optimizer']
  assert adam['param_groups'][0]['betas'] == (0.9, 0.999)
  assert len(adam['state']) == len(names) - 1   # W never has a gradient
  assert all(s['step'].shape == () and s['step'] == 7 for s in adam['state'].values())


def test_torch_ema_keeps_the_untrained_fourier_weights_of_the_model():
  config, _, path = _fixture('torch', 've_ncsnpp_continuous')
  imported = checkpoint_import.import_checkpoint(path, config)
  params, ema = imported['params'], imported['ema_params']
  np.testing.assert_array_equal(ema['all_modules_0']['W'], params['all_modules_0']['W'])
  # The first dense layer is trained, so averaged.
  assert not np.array_equal(ema['all_modules_1']['kernel'], params['all_modules_1']['kernel'])


def test_torch_ema_of_the_wrong_length_names_the_counts():
  config, _, path = _fixture('torch', 've_ncsnpp_continuous')
  ckpt = checkpoint_import.read_torch_checkpoint(path)
  ckpt['ema']['shadow_params'] = ckpt['ema']['shadow_params'] + [np.zeros(4, np.float32)]
  with pytest.raises(ValueError, match=r"157 EMA shadow parameters, but the model has 156 "
                     r"trainable.*module\.all_modules\.0\.W"):
    checkpoint_import.ema_state_dict(ckpt, config, 'ckpt')


def test_flax_params_ema_is_the_whole_tree_and_differs_from_the_model():
  """score_sde's State averages every leaf (params_ema); stop_gradient keeps W fixed."""
  from flax import serialization
  _, _, path = _fixture('flax', 've_ncsnpp_continuous')
  with open(path, 'rb') as f:
    state = serialization.msgpack_restore(f.read())
  target, ema = state['optimizer']['target'], state['params_ema']
  assert int(state['step']) == 7 and set(state['optimizer']) == {'target', 'state'}
  assert jax.tree.structure(target) == jax.tree.structure(ema)
  w = 'GaussianFourierProjection_0'
  np.testing.assert_array_equal(target[w]['W'], ema[w]['W'])
  differ = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(ema))]
  assert sum(differ) == len(differ) - 1


def test_torch_reader_refuses_code_in_the_pickle(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  path = tmp_path / 'evil.pth'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('evil/data.pkl', pickle.dumps({'model': Evil()}))
  with pytest.raises(pickle.UnpicklingError, match='system'):
    checkpoint_import.read_torch_checkpoint(str(path))


# Crafted .pth files, written opcode by opcode (pickle protocol 2, as torch.save writes).


def _p_str(s):
  return pickle.BINUNICODE + struct.pack('<I', len(s.encode())) + s.encode()


def _p_int(v):
  n = (v.bit_length() + 8) // 8   # two's complement, as pickle's LONG1
  return pickle.LONG1 + bytes([n]) + v.to_bytes(n, 'little', signed=True)


def _p_global(module, name):
  return pickle.GLOBAL + f'{module}\n{name}\n'.encode()


def _p_tuple(*items):
  return pickle.MARK + b''.join(items) + pickle.TUPLE


def _p_tensor(offset, size, stride, numel=4, storage='FloatStorage'):
  """torch._utils._rebuild_tensor_v2(storage data/0 of `numel` elements, offset, size, stride,
  requires_grad=False, backward_hooks=OrderedDict())."""
  pid = _p_tuple(_p_str('storage'), _p_global('torch', storage), _p_str('0'), _p_str('cpu'),
                 _p_int(numel)) + pickle.BINPERSID
  hooks = _p_global('collections', 'OrderedDict') + pickle.EMPTY_TUPLE + pickle.REDUCE
  args = _p_tuple(pid, _p_int(offset), _p_tuple(*map(_p_int, size)),
                  _p_tuple(*map(_p_int, stride)), pickle.NEWFALSE, hooks)
  return _p_global('torch._utils', '_rebuild_tensor_v2') + args + pickle.REDUCE


def _p_dict(**items):
  body = b''.join(_p_str(k) + v + pickle.SETITEM for k, v in items.items())
  return pickle.PROTO + b'\x02' + pickle.EMPTY_DICT + body + pickle.STOP


def _write_pth(path, data_pkl, storage=np.arange(4, dtype=np.float32).tobytes()):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', data_pkl)
    z.writestr('archive/byteorder', 'little')
    z.writestr('archive/data/0', storage)
  return str(path)


def test_crafted_pickle_of_valid_views_reads_them(tmp_path):
  """The hand-written format is the one read: a 2x2 view, its transpose, a scalar."""
  path = _write_pth(tmp_path / 'ok.pth', _p_dict(
      a=_p_tensor(0, (2, 2), (2, 1)), t=_p_tensor(0, (2, 2), (1, 2)), s=_p_tensor(3, (), ()),
      e=_p_tensor(9, (0, 3), (3, 1))))
  got = checkpoint_import.read_torch_checkpoint(path)
  np.testing.assert_array_equal(got['a'], [[0, 1], [2, 3]])
  np.testing.assert_array_equal(got['t'], [[0, 2], [1, 3]])
  assert got['s'].shape == () and got['s'] == 3 and got['e'].shape == (0, 3)


_STATE_DICT = _p_global('collections', 'OrderedDict') + pickle.EMPTY_TUPLE + pickle.REDUCE
_CRAFTED = {
    # name: (data.pkl, bytes of storage data/0, error pattern)
    'oversized view': (_p_dict(model=_p_tensor(0, (4096,), (1,))), None,
                       r'size \(4096,\) and stride \(1,\) reach element 4095, past the end'),
    'offset past the end': (_p_dict(model=_p_tensor(4, (1,), (1,))), None,
                            r'offset 4.*reach element 4, past the end'),
    'negative offset': (_p_dict(model=_p_tensor(-8, (1,), (1,))), None,
                        r'storage offset -8 is not an integer >= 0'),
    'negative stride': (_p_dict(model=_p_tensor(3, (4,), (-1,))), None,
                        r'negative stride \(-1,\)'),
    'huge stride': (_p_dict(model=_p_tensor(0, (2,), (2 ** 40,))), None,
                    r'reach element 1099511627776, past the end'),
    'zero stride of 10^12 elements': (_p_dict(model=_p_tensor(0, (10 ** 12,), (0,))), None,
                                      r'1000000000000 elements, more than the storage'),
    'storage shorter than declared': (_p_dict(model=_p_tensor(0, (2,), (1,), numel=4096)),
                                      None, r'data/0 holds 16 bytes; the pickle declares 4096'),
    'BUILD on a rebuild function': (
        pickle.PROTO + b'\x02' + _p_global('torch._utils', '_rebuild_tensor_v2') +
        pickle.EMPTY_DICT + _p_str('__defaults__') + _p_int(1) + pickle.SETITEM + pickle.BUILD +
        pickle.STOP, None,
        r"BUILD \(setting state or attributes \['__defaults__'\]\) on "
        r'torch._utils._rebuild_tensor_v2 is refused'),
    'BUILD on a state dict beyond _metadata': (
        pickle.PROTO + b'\x02' + _STATE_DICT + pickle.EMPTY_DICT + _p_str('update') + _p_int(1) +
        pickle.SETITEM + pickle.BUILD + pickle.STOP, None,
        r"attributes \['update'\]\) on OrderedDict is refused"),
    'global off the allow list': (_p_dict(model=_p_global('builtins', 'getattr')), None,
                                  r'builtins.getattr in the checkpoint is not a tensor rebuild'),
    'torch.device is no tensor': (_p_dict(model=_p_global('torch', 'device')), None,
                                  r'torch.device in the checkpoint is not'),
    'a storage type called': (
        _p_dict(model=_p_global('torch', 'FloatStorage') + _p_tuple(_p_int(4)) + pickle.REDUCE),
        None, r'REDUCE calls a torch.FloatStorage, which is not an allow-listed global'),
    'opcode torch.save never writes': (pickle.PROTO + b'\x02' + pickle.EXT1 + b'\x01' +
                                       pickle.STOP, None, r'opcode EXT1 is not one torch.save'),
    'pickle cut short': (_p_dict(model=_p_tensor(0, (2,), (1,)))[:-30], None,
                         r'malformed pickle at byte'),
}


@pytest.mark.parametrize('name', list(_CRAFTED))
def test_crafted_pth_is_refused_and_nothing_is_written(tmp_path, name):
  """Each crafted file gives an error naming what is wrong, before anything is written."""
  config, _, _ = _fixture('torch', 've_ncsnpp_continuous')
  data_pkl, storage, pattern = _CRAFTED[name]
  kwargs = {} if storage is None else {'storage': storage}
  path = _write_pth(tmp_path / 'crafted.pth', data_pkl, **kwargs)
  workdir = tmp_path / 'out'
  with pytest.raises(pickle.UnpicklingError, match=pattern):
    checkpoint_import.import_into_workdir(config, path, str(workdir))
  assert not workdir.exists()


def test_truncated_or_damaged_zip_is_refused_and_nothing_is_written(tmp_path):
  config, _, path = _fixture('torch', 've_ncsnpp_continuous')
  with open(path, 'rb') as f:
    raw = f.read()
  workdir = tmp_path / 'out'
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(ValueError, match='starts as a zip archive .* truncated or damaged'):
    checkpoint_import.import_into_workdir(config, str(truncated), str(workdir))
  # A storage whose bytes were altered after writing: the zip's CRC check fails.
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(next(n for n in z.namelist() if n.endswith('/data/0')))
  name_len, extra_len = struct.unpack('<HH', raw[info.header_offset + 26:info.header_offset + 30])
  blob = bytearray(raw)
  blob[info.header_offset + 30 + name_len + extra_len] ^= 0xFF   # first byte of its data
  damaged = tmp_path / 'damaged.pth'
  damaged.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match='damaged zip archive'):
    checkpoint_import.import_into_workdir(config, str(damaged), str(workdir))
  assert not workdir.exists()


def test_wrong_config_names_the_mismatch():
  config, _, path = _fixture('torch', 've_ncsnpp_continuous')
  config.model.nf = 8
  with pytest.raises(ValueError, match=r'all_modules_0/W.*shape \(4,\) there and \(8,\)'):
    checkpoint_import.import_checkpoint(path, config)
  config, _, path = _fixture('flax', 've_ncsnpp_continuous')
  config.model.num_res_blocks = 2
  with pytest.raises(ValueError, match='AttnBlock modules with parameters there, 4'):
    checkpoint_import.import_checkpoint(path, config)


def test_unreadable_file_is_a_clear_error(tmp_path):
  config, _, _ = _fixture('torch', 've_ncsnpp_continuous')
  bad = tmp_path / 'ckpt.pth'
  bad.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='neither a PyTorch .zip checkpoint nor'):
    checkpoint_import.import_checkpoint(str(bad), config)
  with pytest.raises(FileNotFoundError, match='no such file'):
    checkpoint_import.import_checkpoint(str(tmp_path / 'missing.pth'), config)


@pytest.mark.slow
def test_command_line_writes_a_workdir_that_eval_restores(tmp_path):
  """The CLI's checkpoint restores through eval_lib (as sample/eval/train do) with the
  imported step, model and EMA parameters, and an optimizer state that fits the config."""
  config, data, path = _fixture('torch', 've_ncsnpp_continuous')
  step, where = checkpoint_import.import_into_workdir(config, path, str(tmp_path))
  assert step == 7 and where == str(tmp_path / 'checkpoints' / 'snapshots' / '7')
  assert workdir.read_record(str(tmp_path))['defining'] == workdir.defining_fields(config)
  comp = builder.build_components(config, (16, 16, 3))
  state, step = eval_lib.restore_for_eval(config, comp, str(tmp_path))
  assert step == 7 and int(state.step) == 7
  _assert_close(_apply(config, state.ema_params['params'], data['x'], data['labels']),
                data['out_ema'])
  _assert_close(_apply(config, state.params['params'], data['x'], data['labels']),
                data['out'])
  # A second import at the same step never replaces the first one's parameters.
  with pytest.raises(FileExistsError, match='already holds a snapshot at step 7'):
    checkpoint_import.import_into_workdir(config, path, str(tmp_path))

