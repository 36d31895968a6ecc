"""eval_lib.py: reports, their protocols, resumable sampling rounds, the sample mode."""
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import builder
import eval_lib
import train_lib
from run_helpers import (image_config_files, tiny_digits_config, toy_config)
from configs.toy import test as test_config


@pytest.mark.slow
def test_eval_and_sample_modes_write_what_they_say(data_dir, tmp_path):
  config = toy_config(data_dir)
  workdir = str(tmp_path)
  train_lib.train(config, workdir)
  reports = eval_lib.evaluate(config, workdir)
  assert [os.path.basename(r) for r in reports] == ['report_20.json', 'report_40.json']
  report = json.load(open(reports[-1]))
  assert set(eval_lib.REPORT_KEYS + eval_lib.TOY_REPORT_KEYS) <= set(report)
  assert report['num_samples'] == config.sampling.num_samples
  assert os.path.exists(report['samples_png'])
  assert all(np.isfinite(report[k]) for k in ('eval_loss', 'bpd', 'test_logp_true', 'test_logp_model'))
  # Preempted evaluation resumes: an existing report is kept, a missing one is redone.
  os.remove(reports[0])
  mtime = os.path.getmtime(reports[1])
  eval_lib.evaluate(config, workdir)
  assert os.path.exists(reports[0]) and os.path.getmtime(reports[1]) == mtime
  # A range that selects no snapshot says which ones exist.
  far = toy_config(data_dir, **{'eval.begin_ckpt': 100})
  with pytest.raises(FileNotFoundError,
                     match=r'No snapshot between eval.begin_ckpt=100 and eval.end_ckpt=the last '
                           r'in .*snapshots; it holds steps \[20, 40\]'):
    eval_lib.evaluate(far, workdir)
  npz, png = eval_lib.sample(config, workdir)
  data = np.load(npz)
  assert data['samples'].shape == (config.sampling.num_samples, 2)
  assert int(data['nfe']) == config.sde.num_scales * 2   # reverse diffusion + Langevin
  assert os.path.getsize(png) > 1000
  # The sample mode draws with any sampler of the config: DPM-Solver++(2M), 9 steps + denoise.
  config.sampling.method, config.sampling.steps = 'dpm_solver_2m', 9
  npz, _ = eval_lib.sample(config, workdir)
  data = np.load(npz)
  assert int(data['nfe']) == 10 and np.all(np.isfinite(data['samples']))
  assert report['sampler'].startswith('pc: reverse_diffusion + langevin')


@pytest.mark.slow
def test_digits_eval_report_with_baselines_resumes_after_a_kill(data_dir, tmp_path):
  config = tiny_digits_config(data_dir)
  workdir = str(tmp_path / 'run')
  comp = builder.build(config)
  state = train_lib.init_state(config, comp)   # untrained: the plumbing is under test
  ckpts = train_lib.Checkpoints(workdir, 1)
  ckpts.save(ckpts.snapshots, 2, state)
  ckpts.wait()
  ckpts.close()
  [path] = eval_lib.evaluate(config, workdir)
  report = json.load(open(path))
  assert set(eval_lib.REPORT_KEYS + eval_lib.SAMPLE_REPORT_KEYS) <= set(report)
  assert report['num_samples'] == 40 and report['sample_features'] == 'digits'
  assert not [d for d in os.listdir(os.path.join(workdir, 'eval')) if d.startswith('rounds_')]
  floor, ceiling = report['sample_baselines']['held_out_real'], report['sample_baselines']['gaussian_fit']
  assert floor['num_samples'] == ceiling['num_samples'] == 40
  assert floor['fid'] * 2 < ceiling['fid'] and floor['inception_score'] > ceiling['inception_score']
  base = report['bpd_baselines']
  assert base['gaussian_mixture']['bpd'] < base['diagonal_gaussian']['bpd'] < 8
  assert all(0 < b['bpd_stderr'] < 0.2 for b in base.values())
  stats = os.path.join(workdir, 'stats', 'digits_train_all_nativepx_digits.npz')
  assert os.path.exists(stats)
  # The report says how each number was computed.
  import evaluation
  protocol = report['sample_protocol']
  assert protocol['reference_statistics'] == stats
  assert protocol['reference_statistics_sha256'] == evaluation.file_sha256(stats)
  assert protocol['weights_sha256'] == evaluation.file_sha256(evaluation.DIGITS_CLASSIFIER_PATH)
  assert protocol['quantization'].startswith('floor') and protocol['num_samples'] == 40
  assert protocol['inception_score_splits'] == 1 and 'inception_score_std' not in report
  bpd = report['bpd_protocol']
  assert bpd['offset_bits'] == (7 if config.data.centered else 8) and bpd['passes'] == 2 and bpd['num_examples'] == 32
  assert bpd['dequantization'].startswith('uniform') and bpd['parameters'] == 'EMA'

  # Killed after the first sampling round: the rerun draws only the missing rounds and gives
  # the uninterrupted numbers.
  config.eval.update(enable_loss=False, enable_bpd=False, enable_baselines=False)
  killed = str(tmp_path / 'killed')
  context = eval_lib.eval_context(config, comp, killed)
  calls = []

  def sampler(key, score_fn, fail_after=None):
    if fail_after is not None and len(calls) >= fail_after:
      raise KeyboardInterrupt('preempted')
    calls.append(key)
    return comp.sampler(key, score_fn)

  with pytest.raises(KeyboardInterrupt):
    eval_lib.evaluate_checkpoint(config, comp._replace(sampler=functools.partial(
        sampler, fail_after=1)), state, 2, killed, context)
  rounds = eval_lib.rounds_dir(config, killed, 2)
  assert sorted(os.listdir(rounds)) == ['round_000000.npz']
  assert np.load(os.path.join(rounds, 'round_000000.npz'))['out'].shape == (16, 64 + 10)
  calls.clear()
  resumed = eval_lib.evaluate_checkpoint(config, comp._replace(sampler=sampler), state, 2, killed,
                                         context)
  assert len(calls) == 2   # rounds 1 and 2 (8 samples) only
  for key in ('fid', 'kid', 'kid_std', 'inception_score', 'num_samples', 'nfe_sampling'):
    np.testing.assert_allclose(resumed[key], report[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize('name', image_config_files())
def test_bits_per_dim_inputs_of_every_image_config_are_dequantized(name):
  """The likelihood in eval sees 8-bit images dequantized as (k + u) / 256, u ~ U[0, 1),
  whatever data.uniform_dequantization says for training (False for CIFAR-10, CelebA, LSUN),
  so the offset of 8 (7 centered) bits is right."""
  import importlib
  import scipy.stats
  config = importlib.import_module(name).get_config()
  builder.validate_config(config, num_devices=1)
  assert config.data.num_bits == 8
  k = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (20000,), 0, 256))
  y = k / 255.0                                     # the data pipeline's [0, 1] values
  x = 2 * y - 1 if config.data.centered else y
  seen = np.asarray(eval_lib.bpd_input(config, jax.random.PRNGKey(1), x), np.float64)
  y_seen = (seen + 1) / 2 if config.data.centered else seen
  u = y_seen * 256 - k                              # the dequantization noise
  assert np.all(u >= -1e-4) and np.all(u < 1 + 1e-4)
  on_grid = np.abs(y_seen * 255 - np.round(y_seen * 255)) < 1e-3
  assert on_grid.mean() < 0.01                      # U[0, 1) lands within 1e-3 of the grid w.p. 0.8%
  assert scipy.stats.kstest(u, 'uniform').statistic < 0.015   # 2.1 / sqrt(n): p ~ 3e-4


def test_toy_data_reach_the_likelihood_unchanged():
  config = test_config.get_config()
  x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(eval_lib.bpd_input(config, jax.random.PRNGKey(0), x)), x)


def _eval_only(config, workdir, state):
  """Saves state as the snapshot of step 2 and evaluates it; returns the report."""
  ckpts = train_lib.Checkpoints(workdir, 1)
  ckpts.save(ckpts.snapshots, 2, state)
  ckpts.wait()
  ckpts.close()
  [path] = eval_lib.evaluate(config, workdir)
  return json.load(open(path))


@pytest.mark.slow
def test_eval_dequantizes_and_runs_the_network_without_dropout(data_dir, tmp_path, monkeypatch):
  """Through eval_lib.evaluate: with data.uniform_dequantization off (as CIFAR-10), the batches
  that reach the likelihood are off the 8-bit grid; and the eval loss runs the network in
  evaluation mode, so it does not depend on the dropout rate."""
  import likelihood
  config = tiny_digits_config(data_dir)
  config.data.uniform_dequantization = False
  config.eval.update(enable_sampling=False, enable_baselines=False, bpd_num_repeats=1)
  seen = []

  def fake_likelihood_fn(sde, **kwargs):
    def lik(key, score_fn, x):
      seen.append(np.asarray(x))
      zeros = jnp.zeros(x.shape[0])
      return likelihood.LikelihoodResult(zeros, zeros, x, jnp.asarray(1))
    return lik

  monkeypatch.setattr(likelihood, 'get_likelihood_fn', fake_likelihood_fn)
  reports = []
  for dropout in (0.0, 0.9):
    config.model.dropout = dropout
    comp = builder.build(config)
    state = train_lib.init_state(config, comp)   # the same parameters for both rates
    reports.append(_eval_only(config, str(tmp_path / f'run_{dropout}'), state))
  assert reports[0]['eval_loss'] == pytest.approx(reports[1]['eval_loss'], rel=1e-6)
  x = np.concatenate(seen)
  assert x.shape[0] == 2 * 32
  on_grid = np.abs(x * 255 - np.round(x * 255)) < 1e-3
  assert on_grid.mean() < 0.01


def test_eval_features_see_samples_floored_to_uint8(data_dir, tmp_path):
  """Samples at (k + 0.6) / 255 reach the feature network as k (the reference's floor; a
  rounding would give k + 1)."""
  config = tiny_digits_config(data_dir)
  config.eval.update(enable_loss=False, enable_bpd=False, enable_baselines=False)
  comp = builder.build(config)
  state = train_lib.init_state(config, comp)
  k = np.random.default_rng(0).integers(0, 255, (16,) + comp.data_shape)
  x = (k + 0.6) / 255.
  x = 2 * x - 1 if config.data.centered else x   # the model's range

  def sampler(key, score_fn):
    return jnp.asarray(x, jnp.float32), 1

  context = eval_lib.eval_context(config, comp, str(tmp_path))
  seen = []

  class Spy:
    name, feature_dim, num_classes = 'digits', 64, 10

    def __call__(self, images):
      seen.append(np.asarray(images))
      return context.evaluator(images)

    def protocol(self):
      return context.evaluator.protocol()

  eval_lib.evaluate_checkpoint(config, comp._replace(sampler=sampler), state, 2, str(tmp_path),
                               context._replace(evaluator=Spy()))
  assert seen and all(s.dtype == np.uint8 for s in seen)
  np.testing.assert_array_equal(seen[0], k)


def test_sample_protocol_says_when_fid_is_not_the_papers(tmp_path):
  """At 256 px and above the reference used another Inception (TF-Hub's ImageNet feature
  vector) and no IS: the report says so; at 32 px it names pytorch-fid's port."""
  from configs.ve import bedroom_ncsnpp_continuous, cifar10
  stats = tmp_path / 'stats.npz'
  stats.write_bytes(b'statistics')

  class FakeInception:
    name = 'inception'

    def protocol(self):
      return {'network': 'FID Inception-v3', 'weights_sha256': '0' * 64}

  for module, size, phrase in ((cifar10, 32, 'pytorch-fid port'),
                               (bedroom_ncsnpp_continuous, 256, 'NOT comparable')):
    config = module.get_config()
    config.eval.stats_path = str(stats)
    protocol = eval_lib.sample_protocol(config, str(tmp_path), FakeInception(), size)
    assert phrase in protocol['comparable_with_paper']
    assert protocol['reference_statistics_sha256'] == hashlib.sha256(b'statistics').hexdigest()
    assert protocol['num_samples'] == config.sampling.num_samples

