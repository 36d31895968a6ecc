"""workdir: a workdir records the config that made its checkpoints, refuses another
model/SDE/data config unless told, and takes one writer per kind of output at a time."""
import json
import os
import subprocess
import sys

import pytest

import run_lib
import workdir
from run_helpers import toy_config


def _checkpointed(config, w):
  """A workdir recorded by a training run that has saved a checkpoint (step 20)."""
  workdir.check(config, w, 'train')
  os.makedirs(os.path.join(w, 'checkpoints', 'snapshots', '20'))
  return w


def test_first_training_run_records_its_config_and_a_matching_config_passes(data_dir, tmp_path):
  config = toy_config(data_dir)
  w = _checkpointed(config, str(tmp_path / 'run'))
  record = json.load(open(os.path.join(w, workdir.RECORD)))
  assert record['defining'] == workdir.defining_fields(config)
  assert record['defining']['sde.name'] == 'vpsde' and record['defining']['model.hidden'] == [32, 32]
  assert 'sde.sigma_min' not in record['defining']       # a VE parameter: not this SDE's
  assert 'sde.num_scales' not in record['defining']      # continuous loss, MLP: sampling only
  assert record['config']['training']['n_iters'] == config.training.n_iters
  # Fields that never change what a checkpoint computes are free to differ.
  other = toy_config(str(tmp_path / 'elsewhere'), **{
      'data.num_workers': 2, 'model.ema_rate': 0.99, 'training.n_iters': 7, 'sampling.method': 'ode',
      'eval.batch_size': 3, 'sde.num_scales': 200, 'sde.sigma_max': 80.0})
  for mode in ('train', 'eval', 'sample', 'inverse'):
    workdir.check(other, w, mode)
  assert json.load(open(os.path.join(w, workdir.RECORD))) == record   # not rewritten


def test_noise_levels_define_a_discrete_model():
  from configs.ve.ncsnv2 import cifar10
  config = cifar10.get_config()
  assert config.sde.name == 'vesde' and 'sde.num_scales' in workdir.defining_fields(config)
  assert {'sde.sigma_min', 'sde.sigma_max'} <= set(workdir.defining_fields(config))


def test_a_record_without_checkpoints_does_not_bind(data_dir, tmp_path):
  """A first run that failed before saving anything leaves the workdir free."""
  w = str(tmp_path)
  workdir.check(toy_config(data_dir, **{'model.hidden': (7,)}), w, 'train')
  fixed = toy_config(data_dir)
  workdir.check(fixed, w, 'train')
  assert workdir.read_record(w)['defining'] == workdir.defining_fields(fixed)
  workdir.check(toy_config(data_dir), str(tmp_path / 'new'), 'eval')   # eval records nothing
  assert not os.path.exists(tmp_path / 'new' / workdir.RECORD)


@pytest.mark.parametrize('mode', ['train', 'eval', 'sample', 'conditional', 'inverse'])
def test_another_sde_model_or_data_is_refused_with_the_differing_fields(data_dir, tmp_path, mode):
  w = _checkpointed(toy_config(data_dir), str(tmp_path))
  other = toy_config(data_dir, **{'sde.name': 'vesde', 'model.hidden': (64, 64),
                                  'data.dataset': 'checkerboard'})
  with pytest.raises(workdir.WorkdirMismatchError) as e:
    run_lib.run(other, w, mode)
  message = str(e.value)
  assert f'--workdir {w} holds checkpoints of another config' in message
  assert "  sde.name: 'vpsde' in the workdir, 'vesde' in this config" in message
  assert "  model.hidden: [32, 32] in the workdir, [64, 64] in this config" in message
  assert "  data.dataset: 'gaussian_mixture' in the workdir, 'checkerboard' in this config" in message
  assert '--allow_config_change' in message
  assert 'sde.beta_min' not in message and 'sigma' not in message   # only what applies and differs


def test_a_field_added_to_the_base_after_the_record_counts_as_its_default(data_dir, tmp_path):
  config = toy_config(data_dir)
  w = _checkpointed(config, str(tmp_path))
  record = workdir.read_record(w)
  del record['defining']['model.fourier_scale']    # a workdir from before the field existed
  json.dump(record, open(os.path.join(w, workdir.RECORD), 'w'))
  workdir.check(config, w, 'eval')
  changed = toy_config(data_dir, **{'model.fourier_scale': 4.0})
  with pytest.raises(workdir.WorkdirMismatchError, match="fourier_scale: 16.0 in the workdir, 4.0"):
    workdir.check(changed, w, 'eval')


def test_allow_config_change_takes_the_new_config_and_a_failed_run_puts_the_old_back(
    data_dir, tmp_path, capsys):
  w = str(tmp_path)
  first = toy_config(data_dir)
  _checkpointed(first, w)
  tuned = toy_config(data_dir, **{'data.dataset': 'checkerboard'})
  workdir.check(tuned, w, 'eval', allow_config_change=True)   # evaluation only warns
  assert workdir.read_record(w)['defining'] == workdir.defining_fields(first)
  # A training that fails before saving leaves the workdir as it was.
  with pytest.raises(RuntimeError, match='shapes'):
    with workdir.claim(tuned, w, 'train', allow_config_change=True):
      raise RuntimeError('checkpoint shapes do not fit')
  assert workdir.read_record(w)['defining'] == workdir.defining_fields(first)
  assert not os.path.exists(tmp_path / 'config.replaced.0.json')
  with workdir.claim(tuned, w, 'train', allow_config_change=True):
    pass
  assert "data.dataset: 'gaussian_mixture' in the workdir" in capsys.readouterr().err
  assert workdir.read_record(w)['defining'] == workdir.defining_fields(tuned)
  kept = json.load(open(tmp_path / 'config.replaced.0.json'))
  assert kept['defining'] == workdir.defining_fields(first)
  workdir.check(tuned, w, 'sample')   # the workdir now belongs to the tuned config


def test_a_damaged_record_is_not_trusted(data_dir, tmp_path):
  w = _checkpointed(toy_config(data_dir), str(tmp_path))
  (tmp_path / workdir.RECORD).write_text('{"defining": ')
  with pytest.raises(workdir.WorkdirMismatchError, match='config.json is damaged'):
    workdir.check(toy_config(data_dir), w, 'train')


def test_a_second_writer_is_refused_and_named_while_eval_may_run_beside_training(data_dir,
                                                                                 tmp_path):
  w = str(tmp_path)
  config = toy_config(data_dir)
  with workdir.claim(config, w, 'train'):
    with pytest.raises(workdir.WorkdirBusyError,
                       match=rf'--workdir {w} is in use by pid {os.getpid()} on .* \(--mode train'):
      run_lib.run(config, w, 'train')
    with pytest.raises(workdir.WorkdirBusyError, match=r'\(--mode train'):
      run_lib.run(config, w, 'all')
    with workdir.claim(config, w, 'eval'):        # score_sde's separate eval job
      with pytest.raises(workdir.WorkdirBusyError, match=r'\(--mode eval'):
        run_lib.run(config, w, 'eval')
    # Another process, the way a second training would meet it.
    code = (f'import sys; sys.path.insert(0, {os.getcwd()!r}); import workdir\n'
            f'with workdir.lock({w!r}, "train"): pass')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and 'WorkdirBusyError' in result.stderr, result.stderr
  with workdir.lock(w, 'train'):   # released with the run
    pass


def test_every_process_stops_when_one_cannot_claim_the_workdir(data_dir, tmp_path):
  """Processes of one run agree: the one refused raises its error, the others a short one
  (instead of going on alone into a collective that never completes)."""
  w = _checkpointed(toy_config(data_dir), str(tmp_path))
  other = toy_config(data_dir, **{'sde.name': 'vesde'})
  votes = []
  with pytest.raises(workdir.WorkdirMismatchError):
    with workdir.claim(other, w, 'eval', agree=lambda ok: votes.append(ok) or False):
      pass
  assert votes == [False]
  with pytest.raises(workdir.WorkdirBusyError, match='another process of this run could not'):
    with workdir.claim(toy_config(data_dir), w, 'eval', agree=lambda ok: False):
      pass
  with workdir.claim(toy_config(data_dir), w, 'eval', agree=lambda ok: ok):
    pass


def test_stats_mode_does_not_check_the_model(data_dir, tmp_path):
  """Dataset statistics depend on the data alone: any model config may compute them."""
  w = _checkpointed(toy_config(data_dir), str(tmp_path))
  with workdir.claim(toy_config(data_dir, **{'model.hidden': (8,)}), w, 'stats'):
    pass
