"""What main.py prints when a run stops on the user's input: a few lines, no traceback.

A user error is a bad setting, path or file: the exception's message already names the field,
value or file and what to do. Anything else is a bug and keeps its traceback. ``--verbose``
shows the traceback of a user error too.
"""
from __future__ import annotations

import errno
import os
import re
import sys

# This module imports nothing heavy: main.py uses it before jax is loaded.


class UserError(Exception):
  """Base of the project's errors about the user's input (damaged files, busy workdirs,
  mismatched configs, diverged training)."""


# Standard exceptions that are user errors when our code raises them (with a message for the
# user); raised inside a library, they are bugs.
_STANDARD_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                         PermissionError, FileExistsError)

VERBOSE_HINT = '(--verbose shows the traceback)'


_PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))


def _chain(exc):
  seen = []
  while exc is not None and exc not in seen:
    seen.append(exc)
    exc = exc.__cause__ or exc.__context__
  return seen


def _raised_in_project(exc) -> bool:
  """Whether the innermost frame of the traceback is this project's code (not a library's)."""
  tb = exc.__traceback__
  if tb is None:
    return True
  while tb.tb_next is not None:
    tb = tb.tb_next
  path = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return path.startswith(_PROJECT_ROOT + os.sep) and 'site-packages' not in path


def user_message(exc: BaseException) -> str | None:
  """The lines to print for a user error, or None for an exception that is a bug.

  A full disk is recognised anywhere in the exception's chain (orbax and tensorstore wrap
  the OS error). Other user errors are our own error types, and the standard ones our code
  raises with a message for the user: a ValueError raised inside a library is a bug.
  """
  for e in _chain(exc):
    if ((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or 'No space left on device' in str(e) or 'Disk quota exceeded' in str(e)):
      filename = getattr(e, 'filename', None)
      where = f' writing {filename}' if filename else ''
      return (f'Disk full{where} (No space left on device): free some space, then run the same '
              'command again (training resumes from its last checkpoint).')
  if isinstance(exc, UserError) or (isinstance(exc, _STANDARD_USER_ERRORS)
                                    and _raised_in_project(exc)):
    return str(exc) or type(exc).__name__
  return None


def run_reporting(fn, verbose: bool):
  """``fn()``; a user error exits with its message in a line or a few (no traceback unless
  ``verbose``), anything else propagates. For the command-line entry points."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001
    message = user_message(e)
    if message is None or verbose:
      raise
    sys.exit(f'error: {message}\n{VERBOSE_HINT}')


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
  # ml_collections names a field that does not exist as 'Key "<key>" does not exist ...'
  # (set in the file) or "'<key>'" (read by a --config.* override), then maybe suggests one.
  unquoted = text.encode().decode('unicode_escape') if '\\n' in text else text
  missing = (re.search(r'Key "(\w+)" does not exist', unquoted)
             or re.match(r"""\s*['"]*(\w+)['"]*\s*(\n|$)""", unquoted))
  if isinstance(exc, AttributeError) and missing:
    key = missing.group(1)
    suggestion = re.search(r'Did you mean "(\w+)"', unquoted)
    hint = f' (did you mean {suggestion.group(1)!r}?)' if suggestion else ''
    flag = next((a.split('=', 1)[0] for a in argv
                 if a.startswith('--config.') and a.split('=', 1)[0].endswith('.' + key)), None)
    if flag is None:   # the config file itself sets it
      return f'--config {path}: the file sets {key!r}, which the config has no field for{hint}.'
    section = flag[len('--config.'):].rsplit('.', 1)[0] if flag.count('.') > 1 else 'the config'
    return f'{flag}: {section} has no field {key!r}{hint}.'
  if isinstance(exc, OSError) and 'Failed loading config file' in text:
    cause = text.strip().splitlines()[-1].strip()
    if not os.path.exists(path):
      return f'--config {path}: no such file.'
    return f'--config {path}: the file could not be loaded ({cause}).'
  return f'--config {path}: {type(exc).__name__}: {text.splitlines()[0] if text else ""}'.rstrip()
