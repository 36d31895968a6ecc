"""checkpoint_import: reference checkpoints (PyTorch .pth, Flax msgpack) reproduce the
reference's outputs in our networks.

The fixtures in tests/fixtures were made by scripts/make_import_fixtures.py (its docstring has
the commands) from tiny reference networks: the reference code computed `out` (model
weights) and `out_ema` (EMA weights) on the stored inputs. Tolerance: the largest absolute
difference is at most 1e-4 of the largest absolute reference output (float32).
"""
import io
import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_import
import run_lib

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
  model = run_lib.make_model(config)
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
  if not np.array_equal(data['out'], data['out_ema']):   # EMA weights differ from the model's
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), imported['params'],
                        imported['ema_params'])
    assert min(jax.tree.leaves(diff)) > 0


def test_torch_reader_reads_state_dict_structure():
  ckpt = checkpoint_import.read_torch_checkpoint(
      os.path.join(FIXTURES, 'import_torch_ve_ncsnpp_continuous.pth'))
  assert set(ckpt) == {'optimizer', 'model', 'ema', 'step'}
  assert all(k.startswith('module.') for k in ckpt['model'])
  w = ckpt['model']['module.all_modules.0.W']   # the Fourier projection, nf = 4
  assert w.dtype == np.float32 and w.shape == (4,)
  assert len(ckpt['ema']['shadow_params']) == len(checkpoint_import.parameter_names(ckpt['model']))
  assert ckpt['optimizer']['param_groups'][0]['betas'] == (0.9, 0.999)


def test_torch_reader_refuses_code_in_the_pickle(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  path = tmp_path / 'evil.pth'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('evil/data.pkl', pickle.dumps({'model': Evil()}))
  with pytest.raises(pickle.UnpicklingError, match='system'):
    checkpoint_import.read_torch_checkpoint(str(path))


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


def test_command_line_writes_a_workdir_that_eval_restores(tmp_path):
  """The CLI's checkpoint restores through run_lib (as sample/eval/train do) with the
  imported step, model and EMA parameters, and an optimizer state that fits the config."""
  config, data, path = _fixture('torch', 've_ncsnpp_continuous')
  imported = checkpoint_import.import_checkpoint(path, config)
  checkpoint_import.write_workdir(config, imported, str(tmp_path))
  comp = run_lib.build_components(config, (16, 16, 3))
  state, step = run_lib._restore_for_eval(config, comp, str(tmp_path))
  assert step == 7 and int(state.step) == 7
  _assert_close(_apply(config, state.ema_params['params'], data['x'], data['labels']),
                data['out_ema'])
  _assert_close(_apply(config, state.params['params'], data['x'], data['labels']),
                data['out'])
