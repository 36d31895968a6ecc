"""Training: the train state, the compiled step, checkpoints, metrics, progress, the loop.

Files under ``workdir``: checkpoints/snapshots (the last few), checkpoints/preemption (the
newest only, frequent), metrics.jsonl, tensorboard/, samples/.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

import builder
import errors
import parallel
import pipeline
import plotting
import progress


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def init_state(config, comp: builder.Components) -> TrainState:
  key = builder.stream_key(config.seed, 'init')
  dummy_x = jnp.zeros((1,) + comp.data_shape)
  # One compiled call: run eagerly, a paper network's init is hundreds of small compilations.
  params = jax.jit(comp.model.init)(key, dummy_x, jnp.zeros((1,)))
  ema_params = jax.tree.map(jnp.copy, params)   # its own buffers: the state is donated
  return TrainState(jnp.zeros((), jnp.int32), params, ema_params, comp.optimizer.init(params))


def ema_decay(ema_rate: float, step, warmup: bool = False):
  """The EMA decay of update number step + 1: ema_rate, or with ``warmup`` the PyTorch
  reference's min(ema_rate, (1 + n) / (10 + n)), n = step + 1 (score_sde in JAX uses the
  fixed rate). The warm-up forgets the random initialization within a few hundred steps;
  the fixed rate keeps a share ema_rate^n of it."""
  if not warmup:
    return ema_rate
  n = (step + 1).astype(jnp.float32)
  return jnp.minimum(ema_rate, (1.0 + n) / (10.0 + n))


def make_train_step(comp: builder.Components, ema_rate: float, unroll: bool | None = None,
                    ema_warmup: bool = False):
  """``multi_step(state, batches, key)``: steps of loss, gradients, optimizer update and EMA
  over ``[steps, batch, ...]`` batches.

  The loss's key of a step is ``key`` (the run's 'train' stream, ``train_key``) folded with
  the step. It is an argument, not a constant of the program: runs that differ only in their
  seed share one compiled step. ``unroll`` writes the steps out instead of looping
  (default: on CPU only). XLA:CPU runs a convolution's gradient inside a loop body about
  30 times slower than in straight-line code (benchmarks/train_benchmark.py measures it),
  while accelerators prefer the loop, which compiles once for any number of steps.
  """
  if unroll is None:
    unroll = jax.default_backend() == 'cpu'

  def step(state: TrainState, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    loss, grads = jax.value_and_grad(comp.loss_fn)(state.params, key, batch)
    updates, opt_state = comp.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(ema_rate, state.step, ema_warmup)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return TrainState(state.step + 1, params, ema, opt_state), loss

  def multi_step(state, batches, key):
    if not unroll:
      return jax.lax.scan(lambda s, b: step(s, b, key), state, batches)
    # Written out step by step: scan(unroll=True) over one step is still a loop of one trip.
    losses = []
    for i in range(jax.tree.leaves(batches)[0].shape[0]):
      state, loss = step(state, jax.tree.map(lambda a, i=i: a[i], batches), key)
      losses.append(loss)
    return state, jnp.stack(losses)

  return multi_step


def train_key(config) -> jax.Array:
  """The key of the training stream (the loss's noise and times), folded with each step."""
  return builder.stream_key(config.seed, 'train')


def compile_train_step(comp, config, mesh, unroll: bool | None = None):
  """``(step_fn, batch_sharding)``: the jitted ``multi_step(state, batches, key)`` of
  make_train_step (state donated) and the sharding of its batches."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(None, 'data'))   # [steps_per_call, batch, ...]
  fn = make_train_step(comp, config.model.ema_rate, unroll, config.model.ema_warmup)
  return jax.jit(fn, in_shardings=(replicated, batch_sharding, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0), batch_sharding


def host_batches(dataset, start_step, steps):
  """This host's batches of steps [start, start + steps), stacked: [steps, batch, ...]."""
  local = [dataset.batch(s) for s in range(start_step, start_step + steps)]
  return jax.tree.map(lambda *xs: np.stack(xs), *local)


def to_global(batches, sharding):
  """Each host's stacked batches as one global array (an asynchronous copy to the devices)."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), batches)


def global_batches(comp, start_step, steps, sharding):
  """The batches of steps [start, start + steps), each host's shard, as one global array."""
  return to_global(host_batches(comp.train_data, start_step, steps), sharding)


def call_schedule(start: int, n_iters: int, steps_per_call: int) -> list[tuple[int, int]]:
  """(first step, number of steps) of each compiled call from ``start`` to ``n_iters``."""
  return [(s, min(steps_per_call, n_iters - s)) for s in range(start, n_iters, steps_per_call)]


class Checkpoints:
  """Two orbax managers; a save is atomic (written to a temporary name, then renamed)."""

  def __init__(self, workdir, keep):
    self.root = root = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    # Each manager's barriers get its own name: a save ends in a thread whose barriers orbax
    # names alike for every manager, so with several processes a snapshot still finishing
    # while the preemption checkpoint started failed in one process ("Barrier
    # ThreadSaveMultiHostValueHolder:set_value_start is already ongoing") and left the other
    # waiting at the shutdown barrier (the two-process test hung so, now and then).
    self.snapshots, self.preemption = (
        ocp.CheckpointManager(os.path.join(root, kind), options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=kind)))
        for kind, max_to_keep in (('snapshots', keep), ('preemption', 1)))

  def candidates(self):
    """(manager, step) of every checkpoint of either kind, newest first."""
    found = [(m, step) for m in (self.preemption, self.snapshots) for step in m.all_steps()]
    return sorted(found, key=lambda ms: -ms[1])

  def restore(self, mngr, step, target):
    """The checkpoint at ``step`` of ``mngr``, shaped like ``target``.

    Raises:
      DamagedCheckpointError: its metadata or its data cannot be read back.
      ValueError: it was written for other shapes (another model.* or optim.* setting).
    """
    where = f'The checkpoint at step {step} in {mngr.directory}'
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      meta = ocp.StandardCheckpointHandler().metadata(
          epath.Path(str(mngr.directory)) / str(step) / 'default')
      tree = getattr(meta, 'tree', meta)
    except Exception:   # orbax raises many kinds here; all mean the same to a user
      tree = None
    if tree is None:
      raise DamagedCheckpointError(f'{where} is damaged: its metadata are missing or unreadable')
    saved = sorted(tuple(a.shape) for a in jax.tree.leaves(tree))
    wanted = sorted(tuple(a.shape) for a in jax.tree.leaves(abstract))
    if saved != wanted:
      raise ValueError(
          f"{where} does not fit this config's model or optimizer (was it written with another "
          f'model.* or optim.* setting?): it holds {len(saved)} arrays, this config '
          f'{len(wanted)}; first shapes that differ: '
          f'{sorted(set(saved) ^ set(wanted))[:3] or "the same shapes, other counts"}')
    try:
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:   # tensorstore and orbax errors run to hundreds of lines
      first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
      raise DamagedCheckpointError(f'{where} is damaged: its data do not read back ({first})') from e

  def restore_newest(self, target):
    """(state, step) of the newest checkpoint that restores, or (None, 0) when there is none.

    A damaged one is reported, renamed to ``<step>.damaged`` (``.damaged1``, ... when taken;
    kept for inspection, out of the way of the step's next save) and the next newest is
    tried; checkpoints that restore are never touched. Raises when checkpoints exist and
    none restores.
    """
    skipped = []
    for mngr, step in self.candidates():
      try:
        return self.restore(mngr, step, target), step
      except DamagedCheckpointError as e:
        skipped.append(str(e))
        aside = self._set_aside(mngr, step)
        print(f'{e}. Skipping it; it is kept as {aside}.', file=sys.stderr)
    if skipped:
      raise DamagedCheckpointError(
          f'No checkpoint in {self.root} restores: ' + '; '.join(skipped))
    return None, 0

  def _set_aside(self, mngr, step):
    """Renames a damaged checkpoint to the first free ``<step>.damaged[n]``; returns that name."""
    path = os.path.join(str(mngr.directory), str(step))
    aside, n = path + '.damaged', 1
    while os.path.exists(aside):
      aside, n = f'{path}.damaged{n}', n + 1
    if jax.process_index() == 0:
      os.rename(path, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
    mngr.reload()
    return os.path.basename(aside)

  def save(self, mngr, step, state):
    mngr.save(step, args=ocp.args.StandardSave(state))

  def wait(self):
    self.snapshots.wait_until_finished()
    self.preemption.wait_until_finished()

  def close(self):
    self.snapshots.close()
    self.preemption.close()


class _Metrics:
  """metrics.jsonl (lines past a resumed step are dropped) and TensorBoard scalars."""

  def __init__(self, workdir, resume_step):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.primary = jax.process_index() == 0
    if not self.primary:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
      with open(self.path, 'w') as f:
        f.writelines(kept)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1)
    except ImportError:   # optional: metrics.jsonl holds the same numbers
      self.tb = None

  def write(self, step, **scalars):
    if not self.primary:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(k, float(v), int(step))

  def close(self):
    if self.primary and self.tb is not None:
      self.tb.close()


class NonFiniteLossError(errors.UserError, RuntimeError):
  """A loss became NaN or inf (the message names the step and the checkpoint to go back to)."""


class DamagedCheckpointError(errors.UserError, RuntimeError):
  """A checkpoint whose files cannot be read back (truncated, garbled, partly missing)."""


class Preempted(Exception):
  """Training stopped on SIGINT or SIGTERM, after saving a preemption checkpoint."""

  def __init__(self, signum, step, directory):
    self.exit_code = 128 + signum   # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    super().__init__(
        f'{signal.Signals(signum).name} received: saved a preemption checkpoint at step {step} '
        f'in {directory}. The same command resumes from there.')


class _StopSignals:
  """While training: SIGINT and SIGTERM (what schedulers send before preemption) are noted,
  and the loop stops after the current call, once its state is saved. A second SIGINT
  stops at once (KeyboardInterrupt), as Ctrl-C usually does."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():   # handlers live there
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._note)
    return self

  def _note(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    print(f'\n{signal.Signals(signum).name} received: saving a preemption checkpoint after '
          f'the current step.', file=sys.stderr, flush=True)

  def requested(self, at_sync_point):
    """The signal every process acts on, or None. With several processes they agree (one
    small collective) at sync points only, so that all of them save the same step."""
    if jax.process_count() == 1:
      return self.signum
    if not at_sync_point:
      return None
    from jax.experimental import multihost_utils
    seen = multihost_utils.process_allgather(np.int32(self.signum or 0))
    return int(np.max(seen)) or None

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _call_batches(dataset, call):
  """Host batches of one compiled call (first step, steps): the pipeline's unit of work."""
  return host_batches(dataset, *call)


class _PendingLosses:
  """Losses of dispatched calls, left on the device until the loop needs them.

  Reading a loss waits for its step; the loop reads them only to log or before a
  checkpoint, and then checks every step since the last read, so a non-finite loss is still
  found at its step and never reaches a checkpoint.
  """

  def __init__(self):
    self._calls = []   # (first step, device losses [steps])

  def add(self, first_step, losses):
    self._calls.append((first_step, losses))
    if len(self._calls) > 2:
      # Bound the queue of dispatched work without stalling the device: wait for the call
      # two back while the two after it are still queued.
      self._calls[-3][1].block_until_ready()

  def read(self, last_good_step, checkpoint_dir, through=None):
    """Losses of the call ending at step ``through`` (default: the last call) on the host,
    after checking that every step up to it is finite; later calls stay pending."""
    done = [c for c in self._calls if through is None or c[0] + c[1].shape[0] <= through]
    values = jax.device_get([losses for _, losses in done])
    for (first, _), v in zip(done, values):
      if not np.all(np.isfinite(v)):
        bad = first + int(np.argmin(np.isfinite(v))) + 1
        good = (f'The last good checkpoint (step {last_good_step}) is kept in {checkpoint_dir}.'
                if last_good_step else 'No checkpoint had been written yet.')
        raise NonFiniteLossError(
            f'Loss became {v[~np.isfinite(v)][0]} at step {bad}; training stopped. {good}')
    self._calls = self._calls[len(done):]
    return values[-1]


def train(config, workdir):
  """Trains, resuming from the newest checkpoint in ``workdir``. Returns the final state.

  The devices never wait on the host: the loop dispatches a compiled call, then reads the
  previous call's losses if a log line is due, and makes the next call's batches (or takes
  them from worker processes: ``pipeline``, data.num_workers, data.prefetch) and starts
  their copy to the devices, all while the call runs. Losses stay on the devices until a
  log line or a checkpoint needs them (`_PendingLosses`); a checkpoint waits for its step.
  """
  comp = builder.build(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  step_fn, batch_sharding = compile_train_step(comp, config, mesh)
  key = train_key(config)
  ckpts = Checkpoints(workdir, config.training.snapshot_keep)
  state = init_state(config, comp)
  restored, start = ckpts.restore_newest(state)
  if restored is not None:
    state = restored
    print(f'Resuming from step {start} ({ckpts.root})', file=sys.stderr)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  metrics = _Metrics(workdir, start)
  bar = progress.bar(config.training.n_iters, 'train', initial=start, unit='step',
                     primary=jax.process_index() == 0)
  tc = config.training
  calls = call_schedule(start, tc.n_iters, tc.steps_per_call)
  # Data served from memory are made here, between dispatches: workers would each hold a copy.
  num_workers = 0 if comp.train_data.in_memory else config.data.num_workers
  batches_of_calls = pipeline.prefetch(functools.partial(_call_batches, comp.train_data), calls,
                                       workers=num_workers, buffer=config.data.prefetch,
                                       put=functools.partial(to_global, sharding=batch_sharding))
  pending = _PendingLosses()
  step, last_good, t0 = start, start, time.time()
  checkpoint_dir = os.path.join(workdir, 'checkpoints')

  def log(at, losses):
    loss = float(np.mean(losses))
    metrics.write(at, loss=loss, learning_rate=float(comp.learning_rate(at)),
                  seconds=time.time() - t0)
    bar.set_postfix(loss=f'{loss:.4f}', refresh=False)
    bar.update(at - bar.n)

  try:
    with _StopSignals() as stop:
      batches = next(batches_of_calls, None)
      log_due = None
      for first, n in calls:
        state, losses = step_fn(state, batches, key)   # returns at once; the devices run it
        pending.add(first, losses)
        step = first + n
        if log_due is not None:   # the previous call's log line, read while this call runs
          log(log_due, pending.read(last_good, checkpoint_dir, through=log_due))
          log_due = None
        batches = next(batches_of_calls, None)   # made and copied while the call runs
        snapshot = step % tc.snapshot_freq == 0 or step == tc.n_iters
        preempt = not snapshot and step % tc.preemption_freq == 0
        if snapshot or preempt:
          # The state is saved before the next call consumes it (its buffers are donated):
          # wait for this call, and check every loss up to it.
          losses = pending.read(last_good, checkpoint_dir)
          if step % tc.log_freq == 0 or step == tc.n_iters:
            log(step, losses)
          ckpts.save(ckpts.snapshots if snapshot else ckpts.preemption, step, state)
          last_good = step
          if snapshot and tc.snapshot_sampling and jax.process_index() == 0:
            _snapshot_samples(config, comp, parallel.host_local(state.ema_params), workdir, step)
        elif step % tc.log_freq == 0:
          log_due = step
        signum = stop.requested(at_sync_point=step % tc.log_freq == 0 or step == last_good)
        if signum is not None:
          if log_due is not None:
            log(log_due, pending.read(last_good, checkpoint_dir, through=log_due))
          if last_good != step:
            pending.read(last_good, checkpoint_dir)
            ckpts.save(ckpts.preemption, step, state)
          raise Preempted(signum, step, checkpoint_dir)
      if log_due is not None:
        log(log_due, pending.read(last_good, checkpoint_dir, through=log_due))
  finally:
    batches_of_calls.close()
    bar.close()
    ckpts.wait()
    ckpts.close()
    metrics.close()
  # Every process must end with the same parameters (they are replicated).
  parallel.check_processes_agree(params_fingerprint(state.params), f'the parameters at step {step}')
  return state


def params_fingerprint(params) -> float:
  """A float summary of replicated parameters, read from this process's own copy."""
  leaves = [np.asarray(x.addressable_data(0), np.float64) for x in jax.tree.leaves(params)]
  return float(sum(np.sum(np.abs(v)) + np.sum(v) * 1e-3 for v in leaves))


def _snapshot_samples(config, comp, params, workdir, step):
  """One batch of samples as a picture, on this process alone (``params`` host-local)."""
  progress.write(f'Step {step}: drawing snapshot samples ({builder.describe_sampler(config)}).')
  x, _ = comp.sampler(builder.stream_key(config.seed, 'snapshot_samples'),
                      comp.score_fn(params))
  path = os.path.join(workdir, 'samples', f'step_{step}.png')
  title = plotting.sample_title(config.data.dataset, step, len(x))
  if step < config.optim.warmup:
    title += f' (inside the {config.optim.warmup}-step warm-up: still noise)'
    progress.write(f'Snapshot samples at step {step}: {path}. Training is still inside its '
                   f'learning-rate warm-up ({config.optim.warmup} steps): expect noise.')
  plotting.save_samples(path, np.asarray(x), config.data.dataset, centered=config.data.centered,
                        title=title)

