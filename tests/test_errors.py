"""errors: a user error (bad config, path or file, a mismatched or busy workdir, a full disk)
is printed by main.py in a line or a few, naming what is wrong, without a traceback; --verbose
shows the traceback; a bug keeps its traceback."""
import errno
import os
import subprocess
import sys

import numpy as np
import pytest

import errors
import train_lib
import workdir
from run_helpers import ROOT, toy_config


def _main(args, cwd):
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py')] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
  return result.returncode, result.stdout + result.stderr


def test_user_errors_are_their_message_and_bugs_are_not_user_errors():
  assert errors.user_message(ValueError('eval.batch_size must be > 0')) == \
      'eval.batch_size must be > 0'
  assert errors.user_message(train_lib.DamagedCheckpointError('x is damaged')) == 'x is damaged'
  assert errors.user_message(workdir.WorkdirBusyError('busy')) == 'busy'
  assert errors.user_message(FileNotFoundError('no such file')) == 'no such file'
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/runs/a/checkpoints/tmp')
  message = errors.user_message(full)
  assert message.startswith('Disk full writing /runs/a/checkpoints/tmp (No space left on device)')
  assert '\n' not in message and 'resumes from its last checkpoint' in message
  for bug in (TypeError('unsupported operand'), AttributeError('x'), KeyError('k'),
              OSError(errno.EIO, 'I/O error')):
    assert errors.user_message(bug) is None
  # A ValueError raised inside a library is a bug (it keeps its traceback); ours is not.
  try:
    np.reshape(np.arange(3), (2, 2))
  except ValueError as e:
    assert errors.user_message(e) is None
  try:
    raise ValueError('eval.batch_size must be > 0')
  except ValueError as e:
    assert errors.user_message(e) == 'eval.batch_size must be > 0'
  # A full disk, wrapped by the library that met it (orbax, tensorstore).
  try:
    try:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/runs/a/ckpt/x')
    except OSError as inner:
      raise RuntimeError('tensorstore write failed') from inner
  except RuntimeError as e:
    assert errors.user_message(e).startswith('Disk full writing /runs/a/ckpt/x')
  wrapped = ValueError('Error writing "x": [UNKNOWN] No space left on device [source locations=...]')
  assert errors.user_message(wrapped).startswith('Disk full (No space left on device)')


@pytest.mark.parametrize('args, expected', [
    (['--config', '{tmp}/no_get_config.py'],
     'error: --config {tmp}/no_get_config.py: the file defines no get_config(). A config file '
     'defines get_config() returning its ConfigDict (see configs/toy/mixture.py).'),
    (['--config', '{tmp}/missing.py'], 'error: --config {tmp}/missing.py: no such file.'),
    (['--config', '{tmp}/typo.py'],
     "error: --config {tmp}/typo.py: the file sets 'hiden', which the config has no field for "
     "(did you mean 'hidden'?)."),
    (['--config', 'configs/toy/test.py', '--config.sde.nme=1'],
     "error: --config.sde.nme: sde has no field 'nme' (did you mean 'name'?)."),
    (['--config', 'configs/toy/test.py', '--config.training.n_iters=abc'],
     "error: flag --config.training.n_iters=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_config_errors_are_one_line_without_traceback(tmp_path, args, expected):
  (tmp_path / 'no_get_config.py').write_text('CONFIG = None\n')
  (tmp_path / 'typo.py').write_text('from configs.toy import test\n\n\ndef get_config():\n'
                                    '  config = test.get_config()\n'
                                    '  config.model.hiden = (8,)\n  return config\n')
  args = [a.format(tmp=tmp_path) for a in args]
  code, out = _main(args + ['--workdir', str(tmp_path / 'w')], ROOT)
  assert code == 1 and out.strip() == expected.format(tmp=tmp_path), out
  assert not (tmp_path / 'w').exists()


def _reported(fn, verbose=False):
  """What main.py prints for fn()'s user error: the exit message of errors.run_reporting."""
  with pytest.raises(SystemExit) as e:
    errors.run_reporting(fn, verbose)
  return str(e.value.code)


@pytest.mark.slow
def test_run_errors_print_the_message_and_verbose_the_traceback(data_dir, tmp_path):
  """A bad setting found at start-up, and a workdir made by another config: a few lines
  naming the field, no traceback, no "\\n" inside a line; --verbose adds the traceback.

  The first goes through main.py end to end (its exit code and output). The others call what
  main.py calls, errors.run_reporting around run_lib.run, in this process: each start of
  main.py costs about 3 s of CPU (importing JAX and the library)."""
  args = ['--config', 'configs/toy/test.py', f'--config.data.data_dir={data_dir}',
          '--workdir', str(tmp_path), '--mode', 'sample']
  code, out = _main(args + ['--config.sde.name=vesde', '--config.sde.sigma_min=0'], ROOT)
  assert code == 1 and 'Traceback' not in out, out
  assert out.strip().splitlines() == [
      'error: Invalid config: VE noise levels need 0 < sde.sigma_min < sde.sigma_max, got '
      'sigma_min=0.0, sigma_max=50.0', errors.VERBOSE_HINT]
  import run_lib
  workdir.check(toy_config(data_dir), str(tmp_path), 'train')   # a VP run's workdir
  os.makedirs(tmp_path / 'checkpoints' / 'snapshots' / '40')
  ve = toy_config(data_dir, **{'sde.name': 'vesde'})
  sample_ve = lambda: run_lib.run(ve, str(tmp_path), 'sample')
  out = _reported(sample_ve)
  assert '\\n' not in out, out
  lines = out.splitlines()
  assert lines[0] == f'error: --workdir {tmp_path} holds checkpoints of another config ' \
                     f'({tmp_path}/config.json); these fields differ:'
  assert "  sde.name: 'vpsde' in the workdir, 'vesde' in this config" in lines
  assert lines[-1] == errors.VERBOSE_HINT
  with pytest.raises(workdir.WorkdirMismatchError):   # --verbose: the error and its traceback
    errors.run_reporting(sample_ve, verbose=True)
  # A workdir with nothing to evaluate.
  empty = tmp_path / 'empty'
  out = _reported(lambda: run_lib.run(toy_config(data_dir), str(empty), 'eval'))
  assert f'error: No snapshot to evaluate in {empty}/checkpoints/snapshots (train first: ' in out
