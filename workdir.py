"""A workdir belongs to one config and one writer at a time.

``<workdir>/config.json`` records the config that made the workdir's checkpoints and the
fields that define what those checkpoints mean: the model, the SDE and the data. A run whose
config differs in any of them is refused with the differing fields (unless the user asks for
the change, for fine-tuning), so that a model never continues on other data, and never samples
or is evaluated under another SDE than the one it was trained with. ``<workdir>/.lock`` keeps a
second run from writing into the same workdir at the same time.
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
LOCK = '.lock'
DEFINING_SECTIONS = ('model', 'sde', 'data')
# Fields of those sections that change where data come from, how fast, or how training
# averages, never what a checkpoint's parameters compute.
NOT_DEFINING = frozenset({
    'data.data_dir', 'data.tfrecords_path', 'data.memory_budget_mb', 'data.num_workers',
    'data.prefetch', 'model.ema_rate', 'model.ema_warmup', 'model.dtype'})
# Modes that create checkpoints: they record the config in a workdir that has none.
_CREATING_MODES = ('train', 'all', 'import')


class WorkdirMismatchError(ValueError):
  """The config differs from the one recorded in the workdir in a defining field."""


class WorkdirBusyError(errors.UserError, RuntimeError):
  """Another run holds the workdir's lock."""


def _plain(value):
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def defining_fields(config) -> dict:
  """{'section.field': value} for the fields that define the checkpoints' meaning."""
  fields = {}
  for section in DEFINING_SECTIONS:
    for name, value in config[section].items():
      key = f'{section}.{name}'
      if key not in NOT_DEFINING:
        fields[key] = _plain(value)
  return fields


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
  """One line per defining field that differs (or exists on one side only)."""
  lines = []
  for key in sorted(set(recorded) | set(current)):
    old, new = recorded.get(key, '(absent)'), current.get(key, '(absent)')
    if old != new:
      lines.append(f'  {key}: {old!r} in the workdir, {new!r} in this config')
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
          writer: bool = True):
  """Refuses a config that differs from the workdir's record in a defining field.

  A workdir without a record gets this config's when ``mode`` creates checkpoints. With
  ``allow_config_change``, a training mode takes the new config as the workdir's (the old
  record is kept as config.replaced.<n>.json); other modes only warn. ``writer``: whether this
  process writes files (process 0 of a multi-process run).
  """
  record = read_record(workdir)
  current = defining_fields(config)
  if record is None:
    if mode in _CREATING_MODES and writer:
      os.makedirs(workdir, exist_ok=True)
      write_record(config, workdir)
    return
  diff = differences(record['defining'], current)
  if not diff:
    return
  where = os.path.join(workdir, RECORD)
  if not allow_config_change:
    raise WorkdirMismatchError(
        f'--workdir {workdir} holds a run of another config ({where}); these fields differ:\n'
        + '\n'.join(diff) + '\nUse another --workdir, or pass --allow_config_change to go on '
        'from its checkpoints with this config (fine-tuning).')
  if writer:
    print(f'--allow_config_change: {workdir} was made with another config:\n' + '\n'.join(diff),
          file=sys.stderr)
  if mode in _CREATING_MODES and writer:
    n = 0
    while os.path.exists(os.path.join(workdir, f'config.replaced.{n}.json')):
      n += 1
    os.replace(where, os.path.join(workdir, f'config.replaced.{n}.json'))
    write_record(config, workdir)


@contextlib.contextmanager
def lock(workdir: str, mode: str):
  """Holds ``<workdir>/.lock`` for a run; another run gets WorkdirBusyError, naming the holder.

  The lock is the kernel's (flock): it goes with the process, so a killed run never leaves a
  stale lock behind. Filesystems without flock run unlocked, with a warning.
  """
  import fcntl
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
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
          writer: bool = True):
  """A run's hold on its workdir: the lock (held by the writing process), then the check.

  'stats' only locks: dataset statistics do not depend on the model or the SDE. A mode that
  reads checkpoints from a workdir that does not exist is left to say so itself.
  """
  def checked():
    if mode != 'stats':
      check(config, workdir, mode, allow_config_change, writer)

  if writer and (mode in _CREATING_MODES or os.path.isdir(workdir)):
    with lock(workdir, mode):
      checked()
      yield
    return
  if os.path.isdir(workdir):
    checked()
  yield
