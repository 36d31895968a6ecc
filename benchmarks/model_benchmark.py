#!/usr/bin/env python
"""Speed and memory of the paper's networks: forward pass and training step, float32 and bfloat16.

For each config, batch size and compute dtype (config model.dtype: float32, or bfloat16
mixed precision with float32 parameters): compile seconds, seconds per forward pass
(the score network's apply, eval mode) and per training step (train_lib's compiled step:
loss with dropout, gradients, optimizer, EMA; exactly what `main.py --mode train` runs,
one step per call), images per second, the memory XLA plans for each compiled function
(arguments + outputs + temporaries - aliased, from ``memory_analysis()``; on GPU also the
device's peak bytes in use so far), the FLOPs XLA counts in each compiled function
(``cost_analysis()``), cross-checked against the reference models' forward cost
(/work/shared/REFERENCE.md: 21.8 GFLOP per 32x32 image for NCSN++ continuous, a training
step about 3x the forward), the achieved TFLOP/s and the model FLOPs utilization against a
peak (--peak_tflops, else a built-in table for H100/H200; unknown on CPU). The baseline of
every ratio column is the same config at float32 and the first (smallest) batch in the
same run.

Each row runs in a fresh process, training step first. On CPU, a step whose planned
memory exceeds the host memory available is not run: the row keeps the forward pass and
the step's plan (FLOPs, bytes) and says why.

With --reference_python and --reference_dir, the reference PyTorch model
(yang-song/score_sde_pytorch) is timed beside it by benchmarks/reference_model_benchmark.py
on the same config, batch and thread count (float32 only), and our/reference ratios of
seconds per forward pass and per training step are reported (< 1: ours is faster).

Usage (repository root):
  python benchmarks/model_benchmark.py [--configs ve/cifar10_ncsnpp_continuous]
      [--batches 8 128] [--dtypes float32 bfloat16] [--steps 3] [--large_steps 1]
      [--peak_tflops X] [--reference_python /tmp/torchenv/bin/python --reference_dir /tmp/ssp]
      [--tiny]   (a narrow network at 8x8: for developing this script)
Writes benchmarks/results/model.json (or --out) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import losses  # noqa: E402
import builder  # noqa: E402
import parallel  # noqa: E402
import train_lib  # noqa: E402
from models import score as score_lib  # noqa: E402

# Forward GFLOP per 32x32 image (multiply-adds x 2) of the reference models, from a FLOP
# counter on them (REFERENCE.md); a training step costs about 3x the forward.
REFERENCE_FORWARD_GFLOP_32 = {
    've/cifar10_ncsnpp_continuous': 21.8, 've/cifar10_ncsnpp_deep_continuous': 37.2,
    'vp/cifar10_ddpmpp_continuous': 21.7, 'vp/ddpm/cifar10': 12.0}

# Dense peak TFLOP/s by device kind substring and compute dtype. float32 convolutions and
# matmuls run on TF32 tensor cores under XLA:GPU's default precision, hence the TF32 peak.
PEAK_TFLOPS = {
    'H100': {'bfloat16': 989.4, 'float32': 494.7},   # SXM, dense (no sparsity)
    'H200': {'bfloat16': 989.4, 'float32': 494.7},
}


def _peak(device, dtype, override):
  if override:
    return override, 'given by --peak_tflops'
  for name, peaks in PEAK_TFLOPS.items():
    if name in device.device_kind:
      return peaks[dtype], f'{name} dense {dtype} peak (float32: TF32 tensor cores)'
  return None, 'unknown (give --peak_tflops)'


def _load_config(name, dtype, tiny):
  config = importlib.import_module('configs.' + name.replace('/', '.')).get_config()
  config.model.dtype = dtype
  config.training.steps_per_call = 1
  if tiny:
    config.data.image_size = 8
    config.model.update(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
  return config


def _random_state(config, comp, seed=0):
  """A train state of init_state's shapes: N(0, 1/fan_in) kernels (no init compile; the
  values do not change the timing), EMA a copy, fresh optimizer state. The parameters are
  float32 for both dtypes."""
  shapes = jax.eval_shape(lambda: train_lib.init_state(config, comp))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    if leaf.ndim == 0:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
    value = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)
    return jnp.asarray(value if leaf.ndim > 1 else 0.01 * value, leaf.dtype)

  params = jax.tree.map(fill, shapes.params)
  return train_lib.TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params),
                            comp.optimizer.init(params))


def _memory(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def _available_host_bytes():
  """MemAvailable from /proc/meminfo (Linux), else None."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _peak_bytes(device):
  try:
    stats = device.memory_stats()
  except Exception:  # CPU: not available
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def measure(name, batch, dtype, repeats, warmup, tiny):
  """One row: compile, time and cost the training step, then the forward pass.

  The step goes first, in a process that has allocated nothing else yet (`main` runs each
  row in a fresh process); on CPU, a step whose XLA plan exceeds the host memory
  available is not run, and the row keeps its plan (FLOPs, bytes) and says why.
  """
  config = _load_config(name, dtype, tiny)
  size, channels = config.data.image_size, config.data.num_channels
  comp = builder.build_components(config, (size, size, channels))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(batch, size, size, channels)), jnp.float32)
  continuous = config.training.loss not in losses.DISCRETE_LOSSES
  t = jnp.asarray(rng.uniform(config.training.eps, 1.0, size=(batch,)), jnp.float32)
  labels, _ = score_lib.reference_labels(comp.sde, t, continuous)
  row = dict(config=name, batch=batch, dtype=dtype, repeats=repeats, warmup=warmup)

  def timed(fn, make_args):
    """Seconds per call: `warmup` untimed calls, then `repeats` timed ones."""
    out = None
    for _ in range(warmup):
      out = fn(*make_args(out))
      jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(repeats):
      out = fn(*make_args(out))
      jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats, out

  # Training step: train_lib's compiled step (state donated), one step per call, compiled
  # from abstract shapes so that nothing is allocated before the plan is known.
  mesh = parallel.make_mesh()
  step_fn, batch_sharding = train_lib.compile_train_step(comp, config, mesh)
  replicated = NamedSharding(mesh, P())
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        jax.eval_shape(lambda: train_lib.init_state(config, comp)))
  batches = jax.device_put({'image': x[None]}, batch_sharding)
  t0 = time.perf_counter()
  key = train_lib.train_key(config)
  step = step_fn.lower(shapes, batches, key).compile()
  row['train_compile_s'] = time.perf_counter() - t0
  row['train_memory_bytes'] = _memory(step)
  row['train_flops'] = _flops(step)
  available = _available_host_bytes()
  if (jax.default_backend() == 'cpu' and available
      and (row['train_memory_bytes'] or 0) > available - 2**29):
    # Running it would be OOM-killed (fp32 batch 128 NCSN++ on a 23.5 GiB host). On
    # XLA:CPU rematerialization does not lower the plan (measured: jax.checkpoint cuts the
    # saved residuals 5x, the planned temp bytes stay the same).
    row['skipped'] = (f"train step plans {row['train_memory_bytes'] / 2**30:.1f} GiB; "
                      f"{available / 2**30:.1f} GiB of host memory available")
  else:
    holder = {'state': jax.device_put(_random_state(config, comp), replicated)}

    def step_args(out):
      if out is not None:
        holder['state'] = out[0]
      return holder['state'], batches, key

    row['train_step_s'], out = timed(step, step_args)
    row['train_loss'] = float(np.asarray(out[1])[0])
    row['device_peak_bytes_so_far'] = _peak_bytes(jax.devices()[0])
    row['train_images_per_s'] = batch / row['train_step_s']
    if row['train_flops']:
      row['train_tflops'] = row['train_flops'] / row['train_step_s'] / 1e12
      row['train_gflop_per_image'] = row['train_flops'] / batch / 1e9
    del holder, out
  del step, batches

  # Forward: the score network in evaluation mode.
  params = _random_state(config, comp).params
  forward = jax.jit(lambda p, x, y: comp.model.apply(p, x, y, train=False))
  t0 = time.perf_counter()
  fwd = forward.lower(params, x, labels).compile()
  row['forward_compile_s'] = time.perf_counter() - t0
  row['forward_s'], _ = timed(fwd, lambda _: (params, x, labels))
  row['forward_memory_bytes'] = _memory(fwd)
  row['forward_flops'] = _flops(fwd)
  row['forward_images_per_s'] = batch / row['forward_s']
  if row['forward_flops']:
    row['forward_tflops'] = row['forward_flops'] / row['forward_s'] / 1e12
    row['forward_gflop_per_image'] = row['forward_flops'] / batch / 1e9
  ref = REFERENCE_FORWARD_GFLOP_32.get(name)
  if ref and not tiny:
    row['reference_forward_gflop_per_image'] = ref * (size / 32) ** 2
  return row


def measure_in_child(name, batch, dtype, repeats, warmup, tiny):
  """`measure` in a fresh process (rows share no memory, allocator state or caches)."""
  cmd = [sys.executable, os.path.abspath(__file__), '--child_row', name, str(batch), dtype,
         str(repeats), str(warmup)] + (['--tiny'] if tiny else [])
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    why = ('killed by the OS (out of memory?)' if proc.returncode in (-9, 137)
           else f'exit code {proc.returncode}')
    raise RuntimeError(f'{name} batch {batch} {dtype}: {why}\n{proc.stderr[-2000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_row(args, name, batch, threads):
  """Times the reference PyTorch model in a subprocess (its own Python, its own imports)."""
  cmd = [args.reference_python, os.path.join(ROOT, 'benchmarks', 'reference_model_benchmark.py'),
         '--reference_dir', args.reference_dir, '--config', name, '--batch', str(batch),
         '--steps', str(args.steps if batch == min(args.batches) else args.large_steps),
         '--threads', str(threads)]
  if args.tiny:
    cmd += ['--tiny', '--image_size', '8']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd='/tmp')
  if proc.returncode:
    print(proc.stderr[-3000:], file=sys.stderr)
    return dict(error=proc.stderr[-500:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(value, spec, width):
  return f'{value:{width}{spec}}' if value is not None else f"{'-':>{width}}"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--configs', nargs='+', default=['ve/cifar10_ncsnpp_continuous'])
  parser.add_argument('--batches', nargs='+', type=int, default=[8, 128])
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  parser.add_argument('--steps', type=int, default=3, help='timed calls at the smallest batch')
  parser.add_argument('--large_steps', type=int, default=None,
                      help='timed calls at larger batches (default: --steps on accelerators, '
                           '1 on CPU, where a batch-128 step takes minutes)')
  parser.add_argument('--peak_tflops', type=float, default=0.0,
                      help='the device peak in TFLOP/s, for model FLOPs utilization')
  parser.add_argument('--reference_python', default=None)
  parser.add_argument('--reference_dir', default=None)
  parser.add_argument('--tiny', action='store_true', help='narrow network at 8x8 (development)')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'model.json'))
  parser.add_argument('--child_row', nargs=5, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_row:   # internal: one row, in its own process (see measure_in_child)
    name, batch, dtype, repeats, warmup = args.child_row
    print(json.dumps(measure(name, int(batch), dtype, int(repeats), int(warmup), args.tiny)))
    return
  device = jax.devices()[0]
  cpu = jax.default_backend() == 'cpu'
  if args.large_steps is None:
    args.large_steps = 1 if cpu else args.steps
  threads = os.cpu_count()
  smallest = min(args.batches)
  t_start = time.perf_counter()

  rows = []
  for name in args.configs:
    for batch in args.batches:
      for dtype in args.dtypes:
        small = batch == smallest
        # CPU, large batch: no untimed warm-up call (the step is already compiled AOT).
        row = measure_in_child(name, batch, dtype, args.steps if small else args.large_steps,
                               1 if (small or not cpu) else 0, args.tiny)
        peak, peak_note = _peak(device, dtype, args.peak_tflops)
        row['peak_tflops'], row['peak_note'] = peak, peak_note
        if peak:
          for kind in ('forward', 'train'):
            if f'{kind}_tflops' in row:
              row[f'{kind}_mfu'] = row[f'{kind}_tflops'] / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
        if 'skipped' in row:
          continue
      if args.reference_python and args.reference_dir:
        ref = reference_row(args, name, batch, threads)
        print('reference:', json.dumps(ref), flush=True)
        for row in rows:
          if row['config'] == name and row['batch'] == batch:
            row['reference'] = ref
            if 'forward_s' in ref:
              row['forward_s_ours_over_reference'] = row['forward_s'] / ref['forward_s']
            if 'train_step_s' in ref and 'train_step_s' in row:
              row['train_step_s_ours_over_reference'] = row['train_step_s'] / ref['train_step_s']

  skipped = [r for r in rows if 'skipped' in r]
  rows = [r for r in rows if 'skipped' not in r]
  for row in rows:
    base = next(r for r in rows if r['config'] == row['config'] and r['batch'] == smallest
                and r['dtype'] == args.dtypes[0])
    row['baseline'] = f"{base['dtype']} batch {base['batch']}"
    row['train_images_per_s_vs_baseline'] = row['train_images_per_s'] / base['train_images_per_s']
    row['forward_images_per_s_vs_baseline'] = (row['forward_images_per_s']
                                               / base['forward_images_per_s'])
    if row['train_memory_bytes'] and base['train_memory_bytes']:
      row['train_memory_vs_baseline'] = row['train_memory_bytes'] / base['train_memory_bytes']

  print(f'device: {device.device_kind} ({jax.default_backend()}, {len(jax.devices())} device(s)); '
        f'jax {jax.__version__}; {threads} CPU threads (XLA default pool; torch set to the same)')
  header = (f"{'config':<30} {'batch':>5} {'dtype':>8} {'fwd s':>8} {'step s':>8} "
            f"{'fwd img/s':>9} {'trn img/s':>9} {'x base':>6} {'GF/img':>7} {'TFLOP/s':>7} "
            f"{'MFU':>6} {'step MiB':>8} {'x base':>6} {'cmp s':>6} {'fwd/ref':>7} {'trn/ref':>7}")
  print(header)
  for r in rows:
    mem = r['train_memory_bytes']
    print(f"{r['config']:<30} {r['batch']:>5} {r['dtype']:>8} {r['forward_s']:>8.3f} "
          f"{r['train_step_s']:>8.3f} {r['forward_images_per_s']:>9.1f} "
          f"{r['train_images_per_s']:>9.1f} {r['train_images_per_s_vs_baseline']:>6.2f} "
          f"{_fmt(r.get('train_gflop_per_image'), '.1f', 7)} {_fmt(r.get('train_tflops'), '.3f', 7)} "
          f"{_fmt(r.get('train_mfu'), '.3f', 6)} {_fmt(mem / 2**20 if mem else None, '.0f', 8)} "
          f"{_fmt(r.get('train_memory_vs_baseline'), '.2f', 6)} "
          f"{r['forward_compile_s'] + r['train_compile_s']:>6.0f} "
          f"{_fmt(r.get('forward_s_ours_over_reference'), '.2f', 7)} "
          f"{_fmt(r.get('train_step_s_ours_over_reference'), '.2f', 7)}")
  for r in skipped:
    print(f"{r['config']} batch {r['batch']} {r['dtype']}: forward {r['forward_s']:.2f} s "
          f"({r['forward_images_per_s']:.1f} img/s, "
          f"x{_fmt(r.get('forward_s_ours_over_reference'), '.2f', 0)} the reference's); "
          f"training step not run: {r['skipped']}")
  print('x base: images/s or memory relative to the baseline row (first dtype, smallest batch); '
        'GF/img: XLA-counted training-step GFLOP per image; ref: ours / reference seconds.')

  result = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      machine=dict(platform=platform.platform(), cpu_count=threads, backend=jax.default_backend(),
                   device_kind=device.device_kind, devices=[str(d) for d in jax.devices()],
                   jax=jax.__version__, load_average_at_end=os.getloadavg()),
      settings=dict(configs=args.configs, batches=args.batches, dtypes=args.dtypes,
                    steps_smallest_batch=args.steps, steps_larger_batches=args.large_steps,
                    warmup=('1 untimed call, except at larger batches on CPU (0: the step is '
                            'compiled ahead of time)'),
                    tiny=args.tiny, threads=threads,
                    threads_note=('XLA:CPU uses its default intra-op pool (one thread per CPU); '
                                  'the reference gets torch.set_num_threads(cpu_count)'),
                    flops_note=('XLA cost_analysis of the compiled function; the reference '
                                'figure counts multiply-adds x 2 of the forward pass'),
                    memory_note=('memory_analysis: argument + output + temp - alias bytes of '
                                 'the compiled function; device_peak_bytes_so_far is the '
                                 'process-wide peak on GPU (None on CPU)')),
      total_seconds=time.perf_counter() - t_start,
      rows=rows, skipped_rows=skipped)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'Wrote {args.out} ({result["total_seconds"]:.0f} s)')


if __name__ == '__main__':
  main()
