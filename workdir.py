"""A workdir belongs to one config and one writer at a time.

``<workdir>/config.json`` records the config that made the workdir's checkpoints and the
fields that define what those checkpoints mean: the model, the SDE and the data. A run whose
config differs in any of them is refused with the differing fields (unless the user asks for
the change, for fine-tuning), so that a model never continues on other data, and never samples
or is evaluated under another SDE than the one it was trained with. ``<workdir>/.lock-<name>``
files (one per kind of output: train, eval, ...) keep a second run from writing the same
outputs at the same time.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys

import errors

RECORD = 'config.json'
# What each mode writes, and so the locks it holds: training and evaluation of one workdir
# may run side by side (score_sde's separate eval job), two of either may not.
LOCKS = {'train': ('train',), 'import': ('train',), 'all': ('train', 'eval'), 'eval': ('eval',),
         'sample': ('sample',), 'stats': ('stats',), 'train_classifier': ('classifier',),
         'conditional': ('conditional',), 'inverse': ('inverse',)}
DEFINING_SECTIONS = ('model', 'sde', 'data')
# Fields of those sections that change where data come from, how fast, or how training
# averages, never what a checkpoint's parameters compute.
NOT_DEFINING = frozenset({
    'data.data_dir', 'data.tfrecords_path', 'data.memory_budget_mb', 'data.num_workers',
    'data.prefetch', 'model.ema_rate', 'model.ema_warmup', 'model.dtype'})
# Modes that create checkpoints: they record the config in a workdir that has none.
_CREATING_MODES = ('train', 'all', 'import')


class WorkdirMismatchError(errors.UserError, ValueError):
  """The config differs from the one recorded in the workdir in a defining field."""


class WorkdirBusyError(errors.UserError, RuntimeError):
  """Another run holds the workdir's lock."""


def _plain(value):
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def _sde_fields_that_apply(config) -> set[str]:
  """The sde fields a checkpoint depends on: the SDE's own parameters, and the number of
  noise levels only where the network or loss is discrete in them (elsewhere it only sets
  how many steps samplers take)."""
  import losses
  fields = {'sde.name'}
  fields |= ({'sde.sigma_min', 'sde.sigma_max'} if config.sde.name.lower() == 'vesde'
             else {'sde.beta_min', 'sde.beta_max'})
  refinenet = config.model.name == 'ncsn' or config.model.name.startswith('ncsnv2')
  if config.training.loss in losses.DISCRETE_LOSSES or refinenet:
    fields.add('sde.num_scales')
  return fields


def defining_fields(config) -> dict:
  """{'section.field': value} for the fields that define the checkpoints' meaning."""
  fields = {}
  sde_fields = _sde_fields_that_apply(config)
  for section in DEFINING_SECTIONS:
    for name, value in config[section].items():
      key = f'{section}.{name}'
      if key in NOT_DEFINING or (section == 'sde' and key not in sde_fields):
        continue
      fields[key] = _plain(value)
  return fields


def _checkpoint_dirs(workdir: str) -> list[str]:
  """The saved checkpoints' directories (train_lib.Checkpoints: checkpoints/<kind>/<step>)."""
  out = []
  for kind in ('snapshots', 'preemption'):
    d = os.path.join(workdir, 'checkpoints', kind)
    if os.path.isdir(d):
      out += [os.path.join(d, n) for n in os.listdir(d) if n.isdigit()]
  return out


def has_checkpoints(workdir: str) -> bool:
  """Whether training or an import has saved a checkpoint here (a record binds only then)."""
  return bool(_checkpoint_dirs(workdir))


def read_record(workdir: str) -> dict | None:
  """The recorded {'defining': ..., 'config': ...}, or None for a workdir without one."""
  path = os.path.join(workdir, RECORD)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    if not isinstance(record.get('defining'), dict):
      raise ValueError('no "defining" fields')
  except (OSError, ValueError) as e:
    raise WorkdirMismatchError(
        f'{path} is damaged ({e}); it records which config made this workdir: restore it, or '
        'delete it to let the next run record its own config') from e
  return record


def differences(recorded: dict, current: dict) -> list[str]:
  """One line per defining field that differs. A field the record lacks (added to the base
  config after the workdir was made) counts as its base default; one the config lacks (or
  that no longer applies, such as the other SDE's parameters) is not compared."""
  from configs import base
  defaults = {}
  default_config = base.get_base_config()
  for key in current:
    section, name = key.split('.', 1)
    if name in default_config[section]:
      defaults[key] = _plain(default_config[section][name])
  lines = []
  for key in sorted(current):
    old = recorded.get(key, defaults.get(key, current[key]))
    if old != current[key]:
      lines.append(f'  {key}: {old!r} in the workdir, {current[key]!r} in this config')
  return lines


def write_record(config, workdir: str) -> str:
  """Writes config.json atomically; returns its path."""
  path = os.path.join(workdir, RECORD)
  record = {'defining': defining_fields(config), 'config': json.loads(config.to_json())}
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  return path


def check(config, workdir: str, mode: str, allow_config_change: bool = False,
          writer: bool = True) -> str | None:
  """Refuses a config that differs from the workdir's record in a defining field.

  The record binds once the workdir holds a checkpoint: before that (a first run that failed
  early, say) a mode that creates checkpoints simply records its own config. With
  ``allow_config_change``, a training mode takes the new config as the workdir's (the old
  record is moved to config.replaced.<n>.json, whose path is returned so that a failed run
  can put it back); other modes only warn. ``writer``: whether this process writes files
  (process 0 of a multi-process run).
  """
  record = read_record(workdir) if has_checkpoints(workdir) else None
  current = defining_fields(config)
  if record is None:
    if mode in _CREATING_MODES and writer:
      os.makedirs(workdir, exist_ok=True)
      write_record(config, workdir)
    return None
  diff = differences(record['defining'], current)
  if not diff:
    return None
  where = os.path.join(workdir, RECORD)
  if not allow_config_change:
    raise WorkdirMismatchError(
        f'--workdir {workdir} holds checkpoints of another config ({where}); these fields '
        'differ:\n' + '\n'.join(diff) + '\nUse another --workdir, or pass '
        '--allow_config_change to use its checkpoints with this config (fine-tuning, or '
        'evaluating under other settings).')
  if writer:
    print(f'--allow_config_change: {workdir} was made with another config:\n' + '\n'.join(diff),
          file=sys.stderr)
  if mode not in _CREATING_MODES or not writer:
    return None
  n = 0
  while os.path.exists(os.path.join(workdir, f'config.replaced.{n}.json')):
    n += 1
  replaced = os.path.join(workdir, f'config.replaced.{n}.json')
  os.replace(where, replaced)
  write_record(config, workdir)
  return replaced


def lock_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, f'.lock-{name}')


@contextlib.contextmanager
def lock(workdir: str, mode: str, name: str | None = None):
  """Holds ``<workdir>/.lock-<name>`` (default: the mode's name) for a run; another run gets
  WorkdirBusyError, naming the holder.

  The lock is the kernel's (flock): it goes with the process, so a killed run never leaves a
  stale lock behind. Filesystems without flock run unlocked, with a warning.
  """
  import fcntl
  os.makedirs(workdir, exist_ok=True)
  path = lock_path(workdir, name or mode)
  f = open(path, 'a+')
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise WorkdirBusyError(f'--workdir {workdir} is in use by {holder}: wait for that run to '
                             'end, or use another --workdir') from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      print(f'warning: cannot lock {path} ({e.strerror}): nothing stops a second run from '
            'writing into this workdir', file=sys.stderr)
      yield
      return
    since = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()} (--mode {mode}, since {since})')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
  finally:
    f.close()


@contextlib.contextmanager
def claim(config, workdir: str, mode: str, allow_config_change: bool = False,
          writer: bool = True, agree=None):
  """A run's hold on its workdir: the mode's locks (held by the writing process), then the
  config check; if the run fails, a record its --allow_config_change replaced is put back.

  ``agree(ok) -> bool``: whether every process is ok (multi-process runs): a process whose
  claim failed raises its error, the others a short one, so that none goes on alone. 'stats'
  only locks: dataset statistics do not depend on the model or the SDE.
  """
  stack = contextlib.ExitStack()
  error, replaced = None, None
  try:
    if writer and (mode in _CREATING_MODES or os.path.isdir(workdir)):
      for name in LOCKS[mode]:
        stack.enter_context(lock(workdir, mode, name))
    if mode != 'stats' and os.path.isdir(workdir):
      replaced = check(config, workdir, mode, allow_config_change, writer)
  except errors.UserError as e:
    error = e
  except BaseException:
    stack.close()
    raise
  if agree is not None and not agree(error is None) and error is None:
    error = WorkdirBusyError(f'another process of this run could not claim --workdir {workdir} '
                             '(its message says why)')
  if error is not None:
    stack.close()
    raise error
  with stack:
    try:
      yield
    except BaseException:
      if replaced is not None and not _saved_since_record(workdir):
        os.replace(replaced, os.path.join(workdir, RECORD))
      raise


def _saved_since_record(workdir: str) -> bool:
  """Whether a checkpoint was written after the current record (the new config's)."""
  since = os.path.getmtime(os.path.join(workdir, RECORD))
  return any(os.path.getmtime(d) > since for d in _checkpoint_dirs(workdir))
