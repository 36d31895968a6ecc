"""The embedded default: a 3-mode 2-D Gaussian mixture (known density), VP SDE, small MLP.

Runs end to end (train, sample, evaluate) in a few minutes on 2 CPU cores.
"""
from configs import base


def get_config():
  config = base.get_base_config()   # the base is already the toy default
  # A step of this MLP takes about 1.5 ms on a CPU core: ten steps per compiled call keep
  # the loop's per-call cost (dispatch, batch copy) under 5% of the step
  # (benchmarks/input_pipeline.py).
  config.training.steps_per_call = 10
  return config
