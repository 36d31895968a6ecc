"""train_lib.py: the training loop, its checkpoints and resume, sharding, several processes."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import builder
import eval_lib
import train_lib
from run_helpers import ROOT, free_port, main_process, restore_final, tiny_paper_config, toy_config


@pytest.mark.slow
def test_sigkill_then_restart_gives_identical_parameters(data_dir, tmp_path):
  """A run killed with SIGKILL and restarted ends with the parameters of an uninterrupted run.

  The uninterrupted run is the same config trained in this process (the entry point only
  parses flags into it), its batches served from memory; the killed one is the entry point in
  a child process, its batches read from storage by a worker process.
  """
  n_iters, every = 150, 25
  flags = {'training.n_iters': n_iters, 'training.preemption_freq': every,
           'training.snapshot_freq': n_iters, 'training.snapshot_sampling': False,
           'training.log_freq': every}
  args = ['--mode', 'train'] + [f'--config.{k}={v}' for k, v in flags.items()]
  config = toy_config(data_dir, **flags)
  args += ['--config.data.num_workers=1', '--config.data.memory_budget_mb=0']
  straight = str(tmp_path / 'straight')
  train_lib.train(config, straight)

  killed = str(tmp_path / 'killed')
  proc = main_process(args + ['--workdir', killed], data_dir)
  preempt = os.path.join(killed, 'checkpoints', 'preemption')
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [int(d) for d in (os.listdir(preempt) if os.path.isdir(preempt) else []) if d.isdigit()]
    if done and max(done) >= 50:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  # Its worker process dies with it (else it would hold the output pipe open: a timeout here).
  proc.communicate(timeout=60)
  assert not os.path.isdir(os.path.join(killed, 'checkpoints', 'snapshots', str(n_iters))), \
      'killed too late'
  proc = main_process(args + ['--workdir', killed], data_dir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert 'Resuming from step' in out
  resumed = int(out.split('Resuming from step ')[1].split()[0])
  assert 50 <= resumed < n_iters

  a, step_a = restore_final(config, straight)
  b, step_b = restore_final(config, killed)
  assert step_a == step_b == n_iters
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # metrics.jsonl has each logged step once, despite the restart.
  steps = [json.loads(line)['step'] for line in open(os.path.join(killed, 'metrics.jsonl'))]
  assert steps == list(range(every, n_iters + 1, every))


SHARDED_SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import builder, parallel, train_lib
    from configs.toy import test as test_config
    assert jax.device_count() == 8, jax.devices()
    config = test_config.get_config()
    config.data.data_dir = {data_dir!r}
    comp = builder.build(config)
    state = train_lib.init_state(config, comp)
    batch = comp.train_data.batch(0)
    out = {{}}
    for n in (1, 8):
      mesh = parallel.make_mesh(jax.devices()[:n])
      sh = NamedSharding(mesh, P('data'))
      rep = NamedSharding(mesh, P())
      b = jax.tree.map(lambda a: jax.device_put(a, sh), batch)
      f = jax.jit(jax.value_and_grad(comp.loss_fn), in_shardings=(rep, rep, sh), out_shardings=rep)
      loss, grads = f(state.params, jax.random.PRNGKey(3), b)
      assert len(b['x'].sharding.device_set) == n
      step_fn, bsh = train_lib.compile_train_step(comp, config, mesh)
      fresh = jax.device_put(jax.tree.map(np.array, state), rep)   # the step donates its input
      s, losses = step_fn(fresh, train_lib.global_batches(comp, 0, 1, bsh),
                          train_lib.train_key(config))
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


@pytest.mark.slow
def test_sharded_step_on_8_devices_matches_one_device(data_dir):
  script = SHARDED_SCRIPT.format(root=ROOT, data_dir=data_dir)
  flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                          timeout=600)
  assert 'SHARDED OK' in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_two_processes_train_in_step(data_dir, tmp_path):
  """Two processes on loopback, joined by jax.distributed.initialize (CPU collectives: gloo),
  run --mode all: they train in step, then share the evaluation's batches and sampling rounds
  (the sample mode draws through the same sample_rounds). One launch for both (process start
  and the distributed handshake are most of this test's time)."""
  port = free_port()
  workdir = str(tmp_path / 'multi')
  args = ['--mode', 'all', '--workdir', workdir, '--multihost',
          f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
          '--config.training.snapshot_sampling=False',
          '--config.eval.batch_size=30', '--config.eval.bpd_max_examples=100',
          '--config.eval.begin_ckpt=40']
  # They read and write the run's shared compilation cache. (Until the checkpoint managers'
  # barriers got their own names, process 0 sometimes waited at the shutdown barrier for
  # 5 minutes: train_lib.Checkpoints.)
  env = {'JAX_PLATFORMS': 'cpu'}
  config = toy_config(data_dir, **{'eval.batch_size': 30, 'eval.bpd_max_examples': 100})
  comp = builder.build(config)   # generates the dataset first, were this test the first to use it
  procs = [main_process(args + [f'--process_id={i}'], data_dir, env=env) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p in procs:   # training ends by checking the processes' parameters agree
    assert p.returncode == 0, '\n\n'.join(f'process {i}:\n{o}' for i, o in enumerate(outs))
  # What a user reads (process 0; the others print nothing): progress of every long phase as
  # plain lines (a pipe is not a terminal), the summary with the README's numbers, no warning
  # (the smoke config's samples stay near the data), nothing for a terminal alone.
  lead, other = outs
  for phase in ('train: 100%', 'eval loss: 100%', 'bits/dim: 100%', 'sampling (pc: '):
    assert phase in lead and phase not in other, phase
  for line in ('  test log-likelihood (nats per point): model ',
               '  energy distance to true samples: model ', 'Picture: '):
    assert line in lead, line
  assert 'warning' not in lead.lower() and '\r' not in lead and '\x1b' not in lead, lead
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', 'snapshots', '40'))

  # The numbers must be those of one process doing everything. The energy distance of the
  # samples changes with any sample.
  report = json.load(open(os.path.join(workdir, 'eval', 'report_40.json')))
  state, _ = eval_lib.restore_for_eval(config, comp, workdir, 40)
  single = eval_lib.evaluate_checkpoint(config, comp, state, 40, str(tmp_path / 'single'))
  for key in ('eval_loss', 'bpd', 'bpd_stderr', 'test_logp_model', 'energy_distance_model',
              'nfe_likelihood', 'nfe_sampling', 'num_samples'):
    np.testing.assert_allclose(report[key], single[key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_sigint_and_sigterm_save_the_step_and_exit_with_the_conventional_code(data_dir, tmp_path):
  """Ctrl-C (SIGINT) or a scheduler's SIGTERM while training: the current step finishes, a
  preemption checkpoint is written at it, one line says so (no traceback), and the exit
  code is 128 + the signal; the same command then resumes from that step."""
  workdir = str(tmp_path)
  args = ['--mode', 'train', '--workdir', workdir, '--config.training.n_iters=1000000',
          '--config.training.preemption_freq=100000', '--config.training.snapshot_freq=500000',
          '--config.training.log_freq=10']
  metrics = os.path.join(workdir, 'metrics.jsonl')
  steps = []
  for signum in (signal.SIGINT, signal.SIGTERM):
    before = len(open(metrics).readlines()) if os.path.exists(metrics) else 0
    proc = main_process(args, data_dir)
    deadline = time.time() + 300
    while time.time() < deadline and (not os.path.exists(metrics)
                                      or len(open(metrics).readlines()) < before + 2):
      time.sleep(0.05)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, out
    assert 'Traceback' not in out, out
    name = signal.Signals(signum).name
    assert f'{name} received: saving a preemption checkpoint after the current step.' in out
    saved = int(out.split(f'{name} received: saved a preemption checkpoint at step ')[1].split()[0])
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', 'preemption', str(saved)))
    if steps:
      assert f'Resuming from step {steps[-1]}' in out and saved > steps[-1]
    steps.append(saved)


def test_pending_losses_are_all_checked_when_read():
  """The loop leaves losses on the device between logs; a read checks every step since."""
  pending = train_lib._PendingLosses()
  pending.add(0, jnp.array([1.0, 2.0]))
  pending.add(2, jnp.array([3.0, 4.0]))
  pending.add(4, jnp.array([np.nan, 5.0]))   # dispatched after the log line of step 4 was due
  np.testing.assert_array_equal(pending.read(0, 'ckpts', through=4), [3.0, 4.0])
  with pytest.raises(train_lib.NonFiniteLossError, match='at step 5;'):
    pending.read(0, 'ckpts')
  pending = train_lib._PendingLosses()
  for first, losses in ((4, [1.0, np.inf]), (6, [1.0, 1.0]), (8, [np.nan, 1.0])):
    pending.add(first, jnp.array(losses))
  with pytest.raises(train_lib.NonFiniteLossError,
                     match=r'^Loss became inf at step 6; training stopped. The last good '
                           r'checkpoint \(step 4\) is kept in ckpts.$'):
    pending.read(4, 'ckpts')
  with pytest.raises(train_lib.NonFiniteLossError, match='No checkpoint had been written yet'):
    pending.read(0, 'ckpts')


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path)
  good = toy_config(data_dir, **{'training.n_iters': 20, 'training.snapshot_sampling': False})
  train_lib.train(good, workdir)
  # Resume with a learning rate that blows the parameters up.
  bad = toy_config(data_dir, **{'optim.lr': 1e12, 'optim.warmup': 0,
                             'training.n_iters': 400, 'training.snapshot_sampling': False})
  with pytest.raises(train_lib.NonFiniteLossError,
                     match=r'Loss became (nan|inf) at step \d+.*last good checkpoint \(step 20\)'):
    train_lib.train(bad, workdir)
  state, step = restore_final(good, workdir)
  assert step == 20
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ve.cifar10_ncsnpp_continuous', 've.ncsnv2.cifar10'])
def test_paper_config_trains_and_samples_at_tiny_size(name, data_dir, tmp_path):
  """The paper's networks through the whole path: loss with dropout, step, checkpoint, sampler."""
  config = tiny_paper_config(name, data_dir)
  state = train_lib.train(config, str(tmp_path))
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
  comp = builder.build(config)
  x, nfe = eval_lib.draw_samples(config, comp, state.ema_params, jax.random.PRNGKey(0), 4)
  assert x.shape == (4, 16, 16, 1) and np.all(np.isfinite(x))
  per_step = {'ald': 1, 'langevin': 1, 'none': 0}[config.sampling.corrector] + \
      (0 if config.sampling.predictor == 'none' else 1)
  assert nfe == config.sde.num_scales * per_step


def test_ema_warmup_follows_the_pytorch_reference(data_dir):
  """decay_n = min(rate, (1 + n) / (10 + n)) at update n = step + 1 with model.ema_warmup;
  the fixed rate otherwise (score_sde in JAX). One real step checks the update uses it."""
  steps = jnp.arange(3000)
  n = np.arange(1, 3001, dtype=np.float64)
  np.testing.assert_allclose(np.asarray(train_lib.ema_decay(0.999, steps, True)),
                             np.minimum(0.999, (1 + n) / (10 + n)), rtol=1e-6)
  assert train_lib.ema_decay(0.999, steps, False) == 0.999
  config = toy_config(data_dir)
  comp = builder.build(config)
  state = train_lib.init_state(config, comp)
  batch = jax.tree.map(lambda a: a[None], comp.train_data.batch(0))
  for warmup, decay in ((True, 2 / 11), (False, config.model.ema_rate)):
    step = jax.jit(train_lib.make_train_step(comp, config.model.ema_rate, True, warmup))
    new, _ = step(jax.tree.map(jnp.copy, state), batch, train_lib.train_key(config))
    want = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new.params)
    for got, w in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-5, atol=1e-7)



@pytest.mark.slow
def test_scanned_steps_equal_written_out_steps(data_dir):
  """Accelerators run the steps of a call in lax.scan; CPU writes them out. Same state."""
  config = toy_config(data_dir)
  comp = builder.build(config)
  state = train_lib.init_state(config, comp)
  batches = jax.tree.map(lambda *xs: np.stack(xs), *[comp.train_data.batch(s) for s in range(3)])
  out = {}
  for unroll in (True, False):
    step = jax.jit(train_lib.make_train_step(comp, config.model.ema_rate, unroll,
                                             config.model.ema_warmup))
    out[unroll] = step(jax.tree.map(jnp.copy, state), batches, train_lib.train_key(config))
  (s_unrolled, l_unrolled), (s_scanned, l_scanned) = out[True], out[False]
  np.testing.assert_allclose(np.asarray(l_scanned), np.asarray(l_unrolled), rtol=1e-5)
  assert int(s_scanned.step) == int(s_unrolled.step) == 3
  # The two programs round differently (how much depends on XLA's emitters): compared per
  # array, relative to its largest value. Measured here: at most 4.5e-6 of that scale; a
  # step too few differs by up to 0.65 of it.
  for a, b in zip(jax.tree.leaves(s_scanned), jax.tree.leaves(s_unrolled)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b), initial=0) <= 1e-4 * np.max(np.abs(b), initial=0), (a, b)


# ----------------------------------------------------------------------------- damaged checkpoints


def _biggest_data_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'default', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


DAMAGES = {
    'missing data chunks': lambda d: [os.remove(f) for f in glob.glob(
        os.path.join(d, 'default', '**', 'd', '*'), recursive=True)],
    'random bytes over a data file': lambda d: open(_biggest_data_file(d), 'r+b').write(
        np.random.default_rng(0).bytes(400)),
    'a truncated data file': lambda d: os.truncate(_biggest_data_file(d), 50),
    'an emptied _METADATA': lambda d: open(os.path.join(d, 'default', '_METADATA'), 'w').close(),
    'the default/ directory removed': lambda d: shutil.rmtree(os.path.join(d, 'default')),
}


@pytest.fixture(scope='module')
def trained_40(data_dir, tmp_path_factory):
  """Snapshots at 20 and 40, the preemption checkpoint at 30; the final parameters."""
  workdir = str(tmp_path_factory.mktemp('trained_40'))
  config = toy_config(data_dir, **{'training.snapshot_sampling': False})
  state = train_lib.train(config, workdir)
  return config, workdir, [np.asarray(x) for x in jax.tree.leaves(state.params)]


# orbax leaves its reader coroutines unfinished when a restore fails: expected here.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_newest_that_restores(trained_40, damage,
                                                                          tmp_path, capsys):
  config, workdir, _ = trained_40
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  snapshots = os.path.join(copy, 'checkpoints', 'snapshots')
  DAMAGES[damage](os.path.join(snapshots, '40'))
  comp = builder.build(config)
  ckpts = train_lib.Checkpoints(copy, config.training.snapshot_keep)
  state, step = ckpts.restore_newest(train_lib.init_state(config, comp))
  ckpts.close()
  assert step == 30
  err = capsys.readouterr().err
  assert f'The checkpoint at step 40 in {snapshots} is damaged' in err, err
  assert 'Skipping it; it is kept as 40.damaged.' in err and len(err.splitlines()) == 1, err
  assert sorted(os.listdir(snapshots)) == ['20', '40.damaged']
  assert os.listdir(os.path.join(copy, 'checkpoints', 'preemption')) == ['30']
  good = train_lib.Checkpoints(workdir, 3)   # the undamaged original
  want = good.restore(good.preemption, 30, train_lib.init_state(config, comp))
  good.close()
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# orbax leaves its reader coroutines unfinished when a restore fails: expected here.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.slow
def test_training_resumes_past_a_damaged_checkpoint_and_eval_skips_it(trained_40, tmp_path,
                                                                      capsys):
  """Resumed from step 30 past a garbled snapshot 40, training ends with the parameters of
  the undamaged run, bit for bit; eval names the damaged snapshot and evaluates the others;
  with every checkpoint damaged, one message names the directory."""
  config, workdir, final = trained_40
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  root = os.path.join(copy, 'checkpoints')
  DAMAGES['random bytes over a data file'](os.path.join(root, 'snapshots', '40'))
  shutil.rmtree(os.path.join(root, 'preemption', '30'))
  e_config = toy_config(config.data.data_dir, **{'eval.bpd_max_examples': 20,
                                                 'training.snapshot_sampling': False})
  assert [os.path.basename(p) for p in eval_lib.evaluate(e_config, copy)] == ['report_20.json']
  assert not os.path.exists(os.path.join(copy, 'eval', 'report_40.json'))
  capsys.readouterr()
  assert eval_lib.evaluate(e_config, copy) == []   # nothing new is written, nothing claimed
  report_20 = os.path.join(copy, 'eval', 'report_20.json')
  assert f'Kept {report_20}, written by an earlier eval' in capsys.readouterr().err
  state = train_lib.train(config, copy)   # from step 20
  for x, y in zip(jax.tree.leaves(state.params), final):
    np.testing.assert_array_equal(np.asarray(x), y)
  assert sorted(os.listdir(os.path.join(root, 'snapshots'))) == ['20', '40', '40.damaged']
  for step in ('20', '40'):
    DAMAGES['an emptied _METADATA'](os.path.join(root, 'snapshots', step))
  shutil.rmtree(os.path.join(copy, 'eval'))   # reports already written are not redone
  with pytest.raises(train_lib.DamagedCheckpointError,
                     match=f'No snapshot between .* in {root}/snapshots restores'):
    eval_lib.evaluate(e_config, copy)
  DAMAGES['an emptied _METADATA'](os.path.join(root, 'preemption', '30'))
  with pytest.raises(train_lib.DamagedCheckpointError, match=f'No checkpoint in {root} restores'):
    train_lib.train(config, copy)


def test_snapshot_samples_inside_the_warm_up_say_so(data_dir, tmp_path, capsys):
  """Early pictures are noise: a line (and the picture's title) says training is still inside
  its learning-rate warm-up; after it, only the usual line."""
  config = toy_config(data_dir, **{'optim.warmup': 100})
  comp = builder.build(config)
  params = train_lib.init_state(config, comp).ema_params
  train_lib._snapshot_samples(config, comp, params, str(tmp_path), 20)
  err = capsys.readouterr().err
  assert 'Step 20: drawing snapshot samples (pc: ' in err
  assert (f"Snapshot samples at step 20: {tmp_path}/samples/step_20.png. Training is still "
          'inside its learning-rate warm-up (100 steps): expect noise.') in err
  train_lib._snapshot_samples(config, comp, params, str(tmp_path), 100)
  assert 'warm-up' not in capsys.readouterr().err
  assert os.path.getsize(tmp_path / 'samples' / 'step_20.png') > 0
