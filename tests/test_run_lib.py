"""The entry point end to end: main.py and run_lib.run."""
import json
import os

import jax
import pytest

import builder
import datasets
import eval_lib
import train_lib
from run_helpers import (main_process, toy_config)


@pytest.mark.slow
def test_short_toy_run_beats_untrained_model(data_dir, tmp_path):
  # Preemption checkpoints every 300 steps, not the test config's 10 (60 orbax saves were
  # half of this test's time; resuming is tested in tests/test_train_lib.py).
  config = toy_config(data_dir, **{'training.n_iters': 600, 'training.snapshot_freq': 600,
                                'training.preemption_freq': 300,
                                'training.snapshot_sampling': False, 'eval.enable_bpd': False,
                                'sampling.num_samples': 500, 'sampling.batch_size': 500})
  config.model.hidden = (64, 64)
  workdir = str(tmp_path)
  state = train_lib.train(config, workdir)
  comp = builder.build(config)
  untrained = train_lib.init_state(config, comp)
  truth = jax.numpy.asarray(datasets.toy_sample('gaussian_mixture', 500, seed=1))
  dist = {}
  for name, params in (('trained', state.ema_params), ('untrained', untrained.params)):
    x, _ = eval_lib.draw_samples(config, comp, params, jax.random.PRNGKey(0), 500)
    dist[name] = eval_lib.energy_distance(x, truth)
  assert dist['trained'] < 0.25 * dist['untrained'], dist
  metrics = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [m['step'] for m in metrics] == list(range(10, 601, 10))
  assert {'loss', 'learning_rate'} <= set(metrics[0])
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def test_misspelled_command_line_key_fails_at_start(data_dir, tmp_path):
  proc = main_process(['--workdir', str(tmp_path), '--config.training.batchsize=8'], data_dir)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and out.strip() == (
      "error: --config.training.batchsize: training has no field 'batchsize' (did you mean "
      "'batch_size'?).")

