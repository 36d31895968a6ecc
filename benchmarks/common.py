"""What the benchmarks share: the record of the machine and the JSON result file."""
from __future__ import annotations

import datetime
import json
import os
import platform

import jax

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def write_result(filename: str, **fields) -> str:
  """benchmarks/results/<filename>: the date, the machine and ``fields``, as JSON."""
  result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                             devices=[str(d) for d in jax.devices()], jax=jax.__version__),
                **fields)
  out = os.path.join(RESULTS_DIR, filename)
  os.makedirs(RESULTS_DIR, exist_ok=True)
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'Wrote {out}')
  return out
