"""workdir: a workdir records the config that made it, refuses another model/SDE/data config
unless told, and takes one writer at a time."""
import json
import os
import subprocess
import sys

import pytest

import run_lib
import workdir
from run_helpers import toy_config


def test_first_training_run_records_its_config_and_a_matching_config_passes(data_dir, tmp_path):
  config = toy_config(data_dir)
  w = str(tmp_path / 'run')
  workdir.check(config, w, 'train')
  record = json.load(open(os.path.join(w, workdir.RECORD)))
  assert record['defining'] == workdir.defining_fields(config)
  assert record['defining']['sde.name'] == 'vpsde' and record['defining']['model.hidden'] == [32, 32]
  assert record['config']['training']['n_iters'] == config.training.n_iters
  # Fields that never change what a checkpoint computes are free to differ.
  other = toy_config(str(tmp_path / 'elsewhere'), **{
      'data.num_workers': 2, 'model.ema_rate': 0.99, 'training.n_iters': 7, 'sampling.method': 'ode',
      'eval.batch_size': 3})
  for mode in ('train', 'eval', 'sample', 'inverse'):
    workdir.check(other, w, mode)
  assert json.load(open(os.path.join(w, workdir.RECORD))) == record   # not rewritten


def test_eval_of_a_workdir_without_a_record_writes_none(data_dir, tmp_path):
  workdir.check(toy_config(data_dir), str(tmp_path), 'eval')
  assert not os.path.exists(tmp_path / workdir.RECORD)


@pytest.mark.parametrize('mode', ['train', 'eval', 'sample', 'conditional', 'inverse'])
def test_another_sde_model_or_data_is_refused_with_the_differing_fields(data_dir, tmp_path, mode):
  w = str(tmp_path)
  workdir.check(toy_config(data_dir), w, 'train')
  other = toy_config(data_dir, **{'sde.name': 'vesde', 'model.hidden': (64, 64),
                                  'data.dataset': 'checkerboard'})
  with pytest.raises(workdir.WorkdirMismatchError) as e:
    run_lib.run(other, w, mode)
  message = str(e.value)
  assert f'--workdir {w} holds a run of another config' in message
  assert "  sde.name: 'vpsde' in the workdir, 'vesde' in this config" in message
  assert "  model.hidden: [32, 32] in the workdir, [64, 64] in this config" in message
  assert "  data.dataset: 'gaussian_mixture' in the workdir, 'checkerboard' in this config" in message
  assert '--allow_config_change' in message
  assert 'sde.beta_min' not in message   # only the fields that differ


def test_allow_config_change_takes_the_new_config_and_keeps_the_old_record(data_dir, tmp_path,
                                                                          capsys):
  w = str(tmp_path)
  first = toy_config(data_dir)
  workdir.check(first, w, 'train')
  tuned = toy_config(data_dir, **{'data.dataset': 'checkerboard'})
  workdir.check(tuned, w, 'eval', allow_config_change=True)   # evaluation only warns
  assert json.load(open(tmp_path / workdir.RECORD))['defining'] == workdir.defining_fields(first)
  workdir.check(tuned, w, 'train', allow_config_change=True)
  assert "data.dataset: 'gaussian_mixture' in the workdir" in capsys.readouterr().err
  assert json.load(open(tmp_path / workdir.RECORD))['defining'] == workdir.defining_fields(tuned)
  kept = json.load(open(tmp_path / 'config.replaced.0.json'))
  assert kept['defining'] == workdir.defining_fields(first)
  workdir.check(tuned, w, 'sample')   # the workdir now belongs to the tuned config


def test_a_damaged_record_is_not_trusted(data_dir, tmp_path):
  (tmp_path / workdir.RECORD).write_text('{"defining": ')
  with pytest.raises(workdir.WorkdirMismatchError, match='config.json is damaged'):
    workdir.check(toy_config(data_dir), str(tmp_path), 'train')


def test_a_second_writer_is_refused_and_named(data_dir, tmp_path):
  w = str(tmp_path)
  config = toy_config(data_dir)
  with workdir.lock(w, 'train'):
    with pytest.raises(workdir.WorkdirBusyError,
                       match=rf'--workdir {w} is in use by pid {os.getpid()} on .* \(--mode train'):
      run_lib.run(config, w, 'train')
    # Another process, the way a second training would meet it.
    code = (f'import sys; sys.path.insert(0, {os.getcwd()!r}); import workdir\n'
            f'with workdir.lock({w!r}, "eval"): pass')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and 'WorkdirBusyError' in result.stderr, result.stderr
  with workdir.lock(w, 'eval'):   # released with the run
    pass


def test_stats_mode_does_not_check_the_model(data_dir, tmp_path):
  """Dataset statistics depend on the data alone: any model config may compute them."""
  w = str(tmp_path)
  workdir.check(toy_config(data_dir), w, 'train')
  with workdir.claim(toy_config(data_dir, **{'model.hidden': (8,)}), w, 'stats'):
    pass
