"""The entry point end to end: training quality, exact resume after SIGKILL, sharding, reports."""
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run_lib
from configs.toy import test as test_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def _config(data_dir, **overrides):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def _main(args, data_dir, env=None, **kwargs):
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--config', os.path.join(ROOT, 'configs/toy/test.py'),
         f'--config.data.data_dir={data_dir}'] + args
  full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
  return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kwargs)


def _restore_final(config, workdir):
  comp = run_lib.build(config)
  state, step = run_lib._restore_for_eval(config, comp, workdir)
  return state, step


def test_short_toy_run_beats_untrained_model(data_dir, tmp_path):
  config = _config(data_dir, **{'training.n_iters': 600, 'training.snapshot_freq': 600,
                                'training.snapshot_sampling': False, 'eval.enable_bpd': False,
                                'sampling.num_samples': 500, 'sampling.batch_size': 500})
  config.model.hidden = (64, 64)
  workdir = str(tmp_path)
  state = run_lib.train(config, workdir)
  comp = run_lib.build(config)
  untrained = run_lib.init_state(config, comp)
  truth = jax.numpy.asarray(run_lib.datasets.toy_sample('gaussian_mixture', 500, seed=1))
  dist = {}
  for name, params in (('trained', state.ema_params), ('untrained', untrained.params)):
    x, _ = run_lib.draw_samples(config, comp, params, jax.random.PRNGKey(0), 500)
    dist[name] = run_lib.energy_distance(x, truth)
  assert dist['trained'] < 0.25 * dist['untrained'], dist
  metrics = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [m['step'] for m in metrics] == list(range(10, 601, 10))
  assert {'loss', 'learning_rate'} <= set(metrics[0])
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def test_sigkill_then_restart_gives_identical_parameters(data_dir, tmp_path):
  args = ['--mode', 'train', '--config.training.n_iters=1500', '--config.training.preemption_freq=50',
          '--config.training.snapshot_freq=1500', '--config.training.snapshot_sampling=False',
          '--config.training.log_freq=50']
  straight = str(tmp_path / 'straight')
  proc = _main(args + ['--workdir', straight], data_dir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out

  killed = str(tmp_path / 'killed')
  proc = _main(args + ['--workdir', killed], data_dir)
  preempt = os.path.join(killed, 'checkpoints', 'preemption')
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [int(d) for d in (os.listdir(preempt) if os.path.isdir(preempt) else []) if d.isdigit()]
    if done and max(done) >= 200:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert not os.path.isdir(os.path.join(killed, 'checkpoints', 'snapshots', '1500')), 'killed too late'
  proc = _main(args + ['--workdir', killed], data_dir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert 'Resuming from step' in out
  resumed = int(out.split('Resuming from step ')[1].split()[0])
  assert 200 <= resumed < 1500

  config = _config(data_dir)
  a, step_a = _restore_final(config, straight)
  b, step_b = _restore_final(config, killed)
  assert step_a == step_b == 1500
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # metrics.jsonl has each logged step once, despite the restart.
  steps = [json.loads(line)['step'] for line in open(os.path.join(killed, 'metrics.jsonl'))]
  assert steps == list(range(50, 1501, 50))


SHARDED_SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import run_lib
    from configs.toy import test as test_config
    assert jax.device_count() == 8, jax.devices()
    config = test_config.get_config()
    config.data.data_dir = {data_dir!r}
    comp = run_lib.build(config)
    state = run_lib.init_state(config, comp)
    batch = comp.train_data.batch(0)
    out = {{}}
    for n in (1, 8):
      mesh = run_lib.make_mesh(jax.devices()[:n])
      sh = NamedSharding(mesh, P('data'))
      rep = NamedSharding(mesh, P())
      b = jax.tree.map(lambda a: jax.device_put(a, sh), batch)
      f = jax.jit(jax.value_and_grad(comp.loss_fn), in_shardings=(rep, rep, sh), out_shardings=rep)
      loss, grads = f(state.params, jax.random.PRNGKey(3), b)
      assert len(b['x'].sharding.device_set) == n
      step_fn, bsh = run_lib.compile_train_step(comp, config, mesh)
      fresh = jax.device_put(jax.tree.map(np.array, state), rep)   # the step donates its input
      s, losses = step_fn(fresh, run_lib.global_batches(comp, 0, 1, bsh))
      out[n] = (float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)], float(losses[0]),
                [np.asarray(p) for p in jax.tree.leaves(s.params)])
    np.testing.assert_allclose(out[8][0], out[1][0], rtol=1e-5)
    for g8, g1 in zip(out[8][1], out[1][1]):
      np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out[8][2], out[1][2], rtol=1e-5)
    for p8, p1 in zip(out[8][3], out[1][3]):
      np.testing.assert_allclose(p8, p1, rtol=1e-4, atol=1e-6)
    print('SHARDED OK')
''')


def test_sharded_step_on_8_devices_matches_one_device(data_dir):
  script = SHARDED_SCRIPT.format(root=ROOT, data_dir=data_dir)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                          timeout=600)
  assert 'SHARDED OK' in result.stdout, result.stdout + result.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_in_step(data_dir, tmp_path):
  """Two processes on loopback, joined by jax.distributed.initialize (CPU collectives: gloo)."""
  port = _free_port()
  workdir = str(tmp_path / 'multi')
  args = ['--mode', 'train', '--workdir', workdir, '--multihost',
          f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
          '--config.training.n_iters=30', '--config.training.snapshot_sampling=False']
  env = {'JAX_PLATFORMS': 'cpu'}
  procs = [_main(args + [f'--process_id={i}'], data_dir, env=env) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  prints = [line.split('fingerprint ')[1] for out in outs for line in out.splitlines()
            if 'params fingerprint' in line]
  assert len(prints) == 2 and prints[0] == prints[1], outs
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', 'snapshots', '30'))

  # Evaluation and sampling split their batches and rounds between the two processes;
  # the numbers must be those of one process doing everything.
  shared = ['--workdir', workdir, '--config.training.n_iters=30', '--config.eval.batch_size=30',
            '--config.eval.bpd_max_examples=100', '--config.eval.begin_ckpt=30']
  for mode in ('eval', 'sample'):
    port = _free_port()
    multi = [f'--mode={mode}', '--multihost', f'--coordinator_address=127.0.0.1:{port}',
             '--num_processes=2'] + shared
    procs = [_main(multi + [f'--process_id={i}'], data_dir, env=env) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out
  report = json.load(open(os.path.join(workdir, 'eval', 'report_30.json')))
  config = _config(data_dir, **{'training.n_iters': 30, 'eval.batch_size': 30,
                                'eval.bpd_max_examples': 100})
  comp = run_lib.build(config)
  state, _ = run_lib._restore_for_eval(config, comp, workdir, 30)
  single = run_lib._evaluate_checkpoint(config, comp, state, 30, str(tmp_path / 'single'))
  for key in ('eval_loss', 'bpd', 'bpd_stderr', 'test_logp_model', 'energy_distance_model',
              'nfe_likelihood', 'nfe_sampling', 'num_samples'):
    np.testing.assert_allclose(report[key], single[key], rtol=1e-5, err_msg=key)
  samples = np.load(os.path.join(workdir, 'samples', 'samples_30.npz'))['samples']
  x, _ = run_lib.draw_samples(config, comp, state.ema_params, jax.random.PRNGKey(config.seed + 3),
                              config.sampling.num_samples)
  np.testing.assert_allclose(samples, x, rtol=1e-5, atol=1e-6)


def test_bad_configs_fail_with_clear_messages(data_dir):
  config = _config(data_dir)
  with pytest.raises(AttributeError, match='batchsize'):
    config.training.batchsize = 8      # misspelled key: the config is locked
  cases = [('sde.name', 'vp', r"sde.name='vp'; valid: \['subvpsde', 'vesde', 'vpsde'\]"),
           ('optim.lr', -1e-3, 'optim.lr must be positive, got -0.001'),
           ('sampling.predictor', 'heun', r"sampling.predictor='heun'; valid"),
           ('sampling.corrector', 'hmc', r"sampling.corrector='hmc'; valid"),
           ('training.loss', 'l1', r"training.loss='l1'"),
           ('training.batch_size', 0, 'training.batch_size must be positive')]
  for key, value, message in cases:
    config = _config(data_dir, **{key: value})
    with pytest.raises(ValueError, match=message):
      run_lib.validate_config(config, num_devices=1)
  config = _config(data_dir, **{'training.batch_size': 64})
  with pytest.raises(ValueError, match='batch_size=64 is not divisible by the 3 devices'):
    run_lib.validate_config(config, num_devices=3)


def test_misspelled_command_line_key_fails_at_start(data_dir, tmp_path):
  proc = _main(['--workdir', str(tmp_path), '--config.training.batchsize=8'], data_dir)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and 'Did you mean "batch_size" instead of "batchsize"?' in out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path)
  good = _config(data_dir, **{'training.n_iters': 20, 'training.snapshot_sampling': False})
  run_lib.train(good, workdir)
  # Resume with a learning rate that blows the parameters up.
  bad = _config(data_dir, **{'optim.lr': 1e12, 'optim.warmup': 0,
                             'training.n_iters': 400, 'training.snapshot_sampling': False})
  with pytest.raises(run_lib.NonFiniteLossError,
                     match=r'Loss became (nan|inf) at step \d+.*last good checkpoint \(step 20\)'):
    run_lib.train(bad, workdir)
  state, step = _restore_final(good, workdir)
  assert step == 20
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def test_eval_and_sample_modes_write_what_they_say(data_dir, tmp_path):
  config = _config(data_dir)
  workdir = str(tmp_path)
  run_lib.train(config, workdir)
  reports = run_lib.evaluate(config, workdir)
  assert [os.path.basename(r) for r in reports] == ['report_20.json', 'report_40.json']
  report = json.load(open(reports[-1]))
  assert set(run_lib.REPORT_KEYS + run_lib.TOY_REPORT_KEYS) <= set(report)
  assert report['num_samples'] == config.sampling.num_samples
  assert os.path.exists(report['samples_png'])
  assert all(np.isfinite(report[k]) for k in ('eval_loss', 'bpd', 'test_logp_true', 'test_logp_model'))
  # Preempted evaluation resumes: an existing report is kept, a missing one is redone.
  os.remove(reports[0])
  mtime = os.path.getmtime(reports[1])
  run_lib.evaluate(config, workdir)
  assert os.path.exists(reports[0]) and os.path.getmtime(reports[1]) == mtime
  npz, png = run_lib.sample(config, workdir)
  data = np.load(npz)
  assert data['samples'].shape == (config.sampling.num_samples, 2)
  assert int(data['nfe']) == config.sde.num_scales * 2   # reverse diffusion + Langevin
  assert os.path.getsize(png) > 1000


def _tiny_paper_config(name, data_dir):
  """A paper config shrunk to run here: digits at 16 px, a narrow network, 20 noise levels."""
  import importlib
  config = importlib.import_module(f'configs.{name}').get_config()
  config.data.update(dataset='digits', image_size=16, num_channels=1, random_flip=False,
                     data_dir=data_dir)
  config.model.nf = 16
  if config.model.name in ('ncsnpp', 'ddpm'):
    config.model.update(ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
  config.sde.num_scales = 20
  config.training.update(batch_size=8, n_iters=2, log_freq=1, snapshot_freq=2, preemption_freq=1,
                         snapshot_sampling=False)
  config.sampling.update(num_samples=4, batch_size=4, n_steps_each=1)
  return config


@pytest.mark.parametrize('name', ['ve.cifar10_ncsnpp_continuous', 've.ncsnv2.cifar10'])
def test_paper_config_trains_and_samples_at_tiny_size(name, data_dir, tmp_path):
  """The paper's networks through the whole path: loss with dropout, step, checkpoint, sampler."""
  config = _tiny_paper_config(name, data_dir)
  state = run_lib.train(config, str(tmp_path))
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
  comp = run_lib.build(config)
  x, nfe = run_lib.draw_samples(config, comp, state.ema_params, jax.random.PRNGKey(0), 4)
  assert x.shape == (4, 16, 16, 1) and np.all(np.isfinite(x))
  per_step = {'ald': 1, 'langevin': 1, 'none': 0}[config.sampling.corrector] + \
      (0 if config.sampling.predictor == 'none' else 1)
  assert nfe == config.sde.num_scales * per_step


def _tiny_digits_config(data_dir):
  """configs/vp/digits.py shrunk: a narrow U-Net, 10 noise levels, 40 samples in rounds of 16."""
  from configs.vp import digits
  config = digits.get_config()
  config.data.data_dir = data_dir
  config.model.update(nf=8, ch_mult=(1,), embed_dim=16)
  config.sde.num_scales = 10
  config.training.update(batch_size=16, n_iters=2, log_freq=1, snapshot_freq=2, preemption_freq=1,
                         snapshot_sampling=False)
  config.sampling.update(num_samples=40, batch_size=16)   # rounds of 16, 16 and 8
  config.eval.update(batch_size=16, bpd_max_examples=32, bpd_num_repeats=2, rtol=1e-2, atol=1e-2)
  return config


def test_digits_eval_report_with_baselines_resumes_after_a_kill(data_dir, tmp_path):
  config = _tiny_digits_config(data_dir)
  workdir = str(tmp_path / 'run')
  comp = run_lib.build(config)
  state = run_lib.init_state(config, comp)   # untrained: the plumbing is under test
  ckpts = run_lib.Checkpoints(workdir, 1)
  ckpts.save(ckpts.snapshots, 2, state)
  ckpts.wait()
  ckpts.close()
  [path] = run_lib.evaluate(config, workdir)
  report = json.load(open(path))
  assert set(run_lib.REPORT_KEYS + run_lib.SAMPLE_REPORT_KEYS) <= set(report)
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
  context = run_lib._eval_context(config, comp, killed)
  calls = []

  def sampler(key, score_fn, fail_after=None):
    if fail_after is not None and len(calls) >= fail_after:
      raise KeyboardInterrupt('preempted')
    calls.append(key)
    return comp.sampler(key, score_fn)

  with pytest.raises(KeyboardInterrupt):
    run_lib._evaluate_checkpoint(config, comp._replace(sampler=functools.partial(
        sampler, fail_after=1)), state, 2, killed, context)
  rounds = run_lib._round_dir(config, killed, 2)
  assert sorted(os.listdir(rounds)) == ['round_000000.npz']
  assert np.load(os.path.join(rounds, 'round_000000.npz'))['out'].shape == (16, 64 + 10)
  calls.clear()
  resumed = run_lib._evaluate_checkpoint(config, comp._replace(sampler=sampler), state, 2, killed,
                                         context)
  assert len(calls) == 2   # rounds 1 and 2 (8 samples) only
  for key in ('fid', 'kid', 'kid_std', 'inception_score', 'num_samples', 'nfe_sampling'):
    np.testing.assert_allclose(resumed[key], report[key], rtol=1e-6, err_msg=key)


def _image_config_files():
  """Every config file of an image dataset (the toy ones hold continuous 2-D points)."""
  import glob
  import importlib
  import datasets
  out = []
  for p in sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'), recursive=True)):
    if p.endswith(('base.py', 'architectures.py', '__init__.py')):
      continue
    name = os.path.relpath(p, ROOT)[:-3].replace(os.sep, '.')
    if importlib.import_module(name).get_config().data.dataset not in datasets.TOY_DISTRIBUTIONS:
      out.append(name)
  return out


@pytest.mark.parametrize('name', _image_config_files())
def test_bits_per_dim_inputs_of_every_image_config_are_dequantized(name):
  """The likelihood in eval sees 8-bit images dequantized as (k + u) / 256, u ~ U[0, 1),
  whatever data.uniform_dequantization says for training (False for CIFAR-10, CelebA, LSUN),
  so the offset of 8 (7 centered) bits is right."""
  import importlib
  import scipy.stats
  config = importlib.import_module(name).get_config()
  run_lib.validate_config(config, num_devices=1)
  assert config.data.num_bits == 8
  k = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (20000,), 0, 256))
  y = k / 255.0                                     # the data pipeline's [0, 1] values
  x = 2 * y - 1 if config.data.centered else y
  seen = np.asarray(run_lib.bpd_input(config, jax.random.PRNGKey(1), x), np.float64)
  y_seen = (seen + 1) / 2 if config.data.centered else seen
  u = y_seen * 256 - k                              # the dequantization noise
  assert np.all(u >= -1e-4) and np.all(u < 1 + 1e-4)
  on_grid = np.abs(y_seen * 255 - np.round(y_seen * 255)) < 1e-3
  assert on_grid.mean() < 0.01                      # U[0, 1) lands within 1e-3 of the grid w.p. 0.8%
  assert scipy.stats.kstest(u, 'uniform').statistic < 0.015   # 2.1 / sqrt(n): p ~ 3e-4


def test_toy_data_reach_the_likelihood_unchanged():
  config = test_config.get_config()
  x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(run_lib.bpd_input(config, jax.random.PRNGKey(0), x)), x)


def test_image_config_without_num_bits_fails_clearly():
  from configs.vp import digits
  config = digits.get_config()
  config.data.num_bits = 0
  with pytest.raises(ValueError, match='data.num_bits=0 but digits holds quantized images'):
    run_lib.validate_config(config, num_devices=1)


def _eval_only(config, workdir, state):
  """Saves state as the snapshot of step 2 and evaluates it; returns the report."""
  ckpts = run_lib.Checkpoints(workdir, 1)
  ckpts.save(ckpts.snapshots, 2, state)
  ckpts.wait()
  ckpts.close()
  [path] = run_lib.evaluate(config, workdir)
  return json.load(open(path))


def test_eval_dequantizes_and_runs_the_network_without_dropout(data_dir, tmp_path, monkeypatch):
  """Through run_lib.evaluate: with data.uniform_dequantization off (as CIFAR-10), the batches
  that reach the likelihood are off the 8-bit grid; and the eval loss runs the network in
  evaluation mode, so it does not depend on the dropout rate."""
  import likelihood
  config = _tiny_digits_config(data_dir)
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
    comp = run_lib.build(config)
    state = run_lib.init_state(config, comp)   # the same parameters for both rates
    reports.append(_eval_only(config, str(tmp_path / f'run_{dropout}'), state))
  assert reports[0]['eval_loss'] == pytest.approx(reports[1]['eval_loss'], rel=1e-6)
  x = np.concatenate(seen)
  assert x.shape[0] == 2 * 32
  on_grid = np.abs(x * 255 - np.round(x * 255)) < 1e-3
  assert on_grid.mean() < 0.01


def test_eval_features_see_samples_floored_to_uint8(data_dir, tmp_path):
  """Samples at (k + 0.6) / 255 reach the feature network as k (the reference's floor; a
  rounding would give k + 1)."""
  config = _tiny_digits_config(data_dir)
  config.eval.update(enable_loss=False, enable_bpd=False, enable_baselines=False)
  comp = run_lib.build(config)
  state = run_lib.init_state(config, comp)
  k = np.random.default_rng(0).integers(0, 255, (16,) + comp.data_shape)
  x = (k + 0.6) / 255.
  x = 2 * x - 1 if config.data.centered else x   # the model's range

  def sampler(key, score_fn):
    return jnp.asarray(x, jnp.float32), 1

  context = run_lib._eval_context(config, comp, str(tmp_path))
  seen = []

  class Spy:
    name, feature_dim, num_classes = 'digits', 64, 10

    def __call__(self, images):
      seen.append(np.asarray(images))
      return context.evaluator(images)

    def protocol(self):
      return context.evaluator.protocol()

  run_lib._evaluate_checkpoint(config, comp._replace(sampler=sampler), state, 2, str(tmp_path),
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
    protocol = run_lib.sample_protocol(config, str(tmp_path), FakeInception(), size)
    assert phrase in protocol['comparable_with_paper']
    assert protocol['reference_statistics_sha256'] == hashlib.sha256(b'statistics').hexdigest()
    assert protocol['num_samples'] == config.sampling.num_samples


def test_ema_warmup_follows_the_pytorch_reference(data_dir):
  """decay_n = min(rate, (1 + n) / (10 + n)) at update n = step + 1 with model.ema_warmup;
  the fixed rate otherwise (score_sde in JAX). One real step checks the update uses it."""
  steps = jnp.arange(3000)
  n = np.arange(1, 3001, dtype=np.float64)
  np.testing.assert_allclose(np.asarray(run_lib.ema_decay(0.999, steps, True)),
                             np.minimum(0.999, (1 + n) / (10 + n)), rtol=1e-6)
  assert run_lib.ema_decay(0.999, steps, False) == 0.999
  config = _config(data_dir)
  comp = run_lib.build(config)
  state = run_lib.init_state(config, comp)
  batch = jax.tree.map(lambda a: a[None], comp.train_data.batch(0))
  for warmup, decay in ((True, 2 / 11), (False, config.model.ema_rate)):
    step = jax.jit(run_lib.make_train_step(comp, config.model.ema_rate, config.seed, True, warmup))
    new, _ = step(jax.tree.map(jnp.copy, state), batch)
    want = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new.params)
    for got, w in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-5, atol=1e-7)
