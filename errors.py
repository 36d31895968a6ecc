"""What main.py prints when a run stops on the user's input: a few lines, no traceback.

A user error is a bad setting, path or file: the exception's message already names the field,
value or file and what to do. Anything else is a bug and keeps its traceback. ``--verbose``
shows the traceback of a user error too.
"""
from __future__ import annotations

import errno
import os
import re

# This module imports nothing heavy: main.py uses it before jax is loaded.


class UserError(Exception):
  """Base of the project's errors about the user's input (damaged files, busy workdirs,
  mismatched configs, diverged training)."""


_USER_ERROR_TYPES = (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                     IsADirectoryError, PermissionError, FileExistsError)

VERBOSE_HINT = '(--verbose shows the traceback)'


def user_message(exc: BaseException) -> str | None:
  """The lines to print for a user error, or None for an exception that is a bug."""
  if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
    where = f' writing {exc.filename}' if exc.filename else ''
    return (f'Disk full{where} ({os.strerror(exc.errno)}): free some space, then run the same '
            'command again (training resumes from its last checkpoint).')
  if isinstance(exc, KeyError) and isinstance(exc, UserError):
    return str(exc.args[0]) if exc.args else 'KeyError'
  if isinstance(exc, _USER_ERROR_TYPES):
    return str(exc) or type(exc).__name__
  return None


def _config_path(argv) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return 'the default config'


def config_flag_message(exc: BaseException, argv) -> str:
  """One message for an error raised while --config and its --config.* overrides are read."""
  text = str(exc)
  path = _config_path(argv)
  if isinstance(exc, AttributeError) and "has no attribute 'get_config'" in text:
    return (f'--config {path}: the file defines no get_config(). A config file defines '
            'get_config() returning its ConfigDict (see configs/toy/mixture.py).')
  # ml_collections: "'<key>'\nDid you mean "<name>" instead of "<key>"?" for a field that
  # does not exist (the message arrives as the repr of a KeyError's).
  unquoted = text.encode().decode('unicode_escape') if '\\n' in text else text
  missing = re.search(r"'(\w+)'", unquoted)
  if isinstance(exc, AttributeError) and missing:
    key = missing.group(1)
    flag = next((a.split('=', 1)[0] for a in argv
                 if a.startswith('--config.') and a.split('=', 1)[0].endswith('.' + key)),
                f'--config.{key}')
    suggestion = re.search(r'Did you mean "(\w+)"', unquoted)
    hint = f' (did you mean {suggestion.group(1)!r}?)' if suggestion else ''
    section = flag[len('--config.'):].rsplit('.', 1)[0] if flag.count('.') > 1 else 'the config'
    return f'{flag}: {section} has no field {key!r}{hint}.'
  if isinstance(exc, OSError) and 'Failed loading config file' in text:
    cause = text.strip().splitlines()[-1].strip()
    if not os.path.exists(path):
      return f'--config {path}: no such file.'
    return f'--config {path}: the file could not be loaded ({cause}).'
  return f'--config {path}: {type(exc).__name__}: {text.splitlines()[0] if text else ""}'.rstrip()
