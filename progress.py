"""Progress bars of the long phases: training, evaluation passes, sampling rounds.

tqdm on a terminal. Into a log file or a pipe (a scheduler's output), a plain line at most
every ``LOG_INTERVAL_S`` seconds, without the carriage returns a terminal bar is drawn with.
Only process 0 of a multi-process run shows them.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


class _Lines:
  """A stream for tqdm outside a terminal: each redraw becomes one line."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text):
    text = text.replace('\r', '').strip()
    if text:
      self.stream.write(text + '\n')

  def flush(self):
    self.stream.flush()


def bar(total: int, desc: str, initial: int = 0, unit: str = 'it', primary: bool = True):
  """A tqdm bar on stderr (disabled where ``primary`` is False: not process 0)."""
  tty = sys.stderr.isatty()
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not primary,
              file=sys.stderr if tty else _Lines(sys.stderr), dynamic_ncols=tty,
              ncols=None if tty else 100, mininterval=0.2 if tty else LOG_INTERVAL_S,
              leave=True)


def write(message: str):
  """A line that does not break a bar being drawn."""
  tqdm.write(message, file=sys.stderr)
