"""progress: outside a terminal (a log, a pipe) a bar is plain lines, at most one per
LOG_INTERVAL_S, with no carriage return or escape code; processes other than 0 print nothing."""
import io
import sys

import progress


def test_bar_outside_a_terminal_writes_plain_lines(monkeypatch):
  out = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', out)
  with progress.bar(40, 'train', initial=10, unit='step') as bar:
    bar.set_postfix(loss='0.5000', refresh=False)
    bar.update(30)
    progress.write('a message')
  text = out.getvalue()
  assert '\r' not in text and '\x1b' not in text
  lines = text.splitlines()
  assert lines[0].startswith('train:  25%|') and '10/40' in lines[0]
  assert 'a message' in lines
  assert lines[-1].startswith('train: 100%|') and '40/40' in lines[-1] and 'loss=0.5000' in lines[-1]


def test_bar_of_another_process_is_silent(monkeypatch):
  out = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', out)
  with progress.bar(3, 'bits/dim', primary=False) as bar:
    bar.update(3)
  assert out.getvalue() == ''
