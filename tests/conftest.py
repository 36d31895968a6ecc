"""Shared test settings: silent broadcasting raises, XLA spends little time optimizing,
compiled programs are cached on disk for the whole run, and helpers over the analytic mixture."""
import os
import shutil
import tempfile
import threading

# Most tests compile a program, run it once or a few times on tiny inputs and check the
# numbers: XLA's optimization passes then cost more than they save (the suite runs in about
# three quarters of the time without them). Tests that run long loops (training, Monte Carlo,
# long samplers) carry @pytest.mark.optimized and run fully optimized, as users' runs do.
# Set in the environment, so that the processes the tests start compile the same way.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# Two XLA:CPU options that cut the CPU time of a low-effort compile (the suite is bound by
# compiling), with results that agree to float32 rounding: the older loop emitters instead of
# the MLIR fusion emitters, and each program's machine code made in one piece rather than
# split for threads (three workers on two cores: the threads only compete). On the suite's
# programs (paper networks' train steps and samplers, fast samplers) the first saves 45% of
# compile CPU and the second 12% more (benchmarks/compile_benchmark.py). They also make some
# programs run slower (2000-step Monte Carlo tests took 2-3 times as long), so tests marked
# ``optimized`` compile without them, as users' runs do. This process adds them per compile
# (below); the processes the tests start read them from XLA_FLAGS.
LOW_EFFORT_XLA_OPTIONS = {'xla_cpu_use_fusion_emitters': False,
                          'xla_cpu_parallel_codegen_split_count': 1}


def _xla_flags(low_effort):
  """XLA_FLAGS as inherited, with LOW_EFFORT_XLA_OPTIONS set as flags or taken out."""
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if f.lstrip('-').split('=')[0] not in LOW_EFFORT_XLA_OPTIONS]
  if low_effort:
    kept += [f'--{k}={str(v).lower()}' for k, v in LOW_EFFORT_XLA_OPTIONS.items()]
  return ' '.join(kept)


os.environ['XLA_FLAGS'] = _xla_flags(False)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax._src import compiler as _jax_compiler  # noqa: E402


def _start_backend():
  """Starts JAX's CPU backend, which reads XLA_FLAGS (without the options) once.

  An xdist worker, when there are at least as many workers as cores, starts it seeing one
  core: XLA sizes its thread pool from the cores a process may run on when the backend
  starts, and with every core already busy with a worker of its own, a second thread per
  program only adds synchronization. Run on one core, a test_losses training (ESM, 2000
  steps) took 12.3 s of CPU instead of 15.6 s, with the same result. The process may use
  every core again afterwards; only its thread pool stays at one thread.
  """
  cpus = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else set()
  workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '0'))
  if len(cpus) < 2 or workers < len(cpus):
    jax.devices()
    return
  os.sched_setaffinity(0, {min(cpus)})
  try:
    jax.devices()
  finally:
    # Every thread, not only this one: those the backend started inherited the one core.
    for thread in os.listdir('/proc/self/task'):
      try:
        os.sched_setaffinity(int(thread), cpus)
      except ProcessLookupError:   # the thread has ended since
        pass


_start_backend()
_LOW_EFFORT = os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] not in ('0', 'false', 'False', '')
os.environ['XLA_FLAGS'] = _xla_flags(_LOW_EFFORT)   # for the processes the tests start

# JAX has no global setting for compiler options: its one function that makes them gets the
# options added whenever jax_disable_most_optimizations is on. Should a JAX release rename
# it, the suite runs as before, only slower.
#
# Tests marked ``optimized`` compile fully optimized only the programs with a loop (what the
# marker is for: training, Monte Carlo and samplers that loop thousands of times); their
# straight-line programs, run once or a few times, compile with little effort like the other
# tests'. Those are many: each operation run eagerly (a random draw, an init, a reduction) is
# a program of its own, and a few-step solver is written out step by step. On the optimized
# tests alone (pytest -m optimized) this cut the CPU time from 311 s to 244 s. JAX looks at
# each program's MLIR module just before it makes its options (to decide on detailed
# logging); the loop is looked for there.
_program = threading.local()


def _has_loop(module) -> bool:
  """Whether the MLIR module contains a while loop (in any of its functions)."""
  stack = [module.operation]
  while stack:
    op = stack.pop()
    if op.operation.name == 'stablehlo.while':
      return True
    stack.extend(child for region in op.regions for block in region for child in block)
  return False


_original_get_compile_options = getattr(_jax_compiler, 'get_compile_options', None)
_original_use_detailed_logging = getattr(_jax_compiler, 'use_detailed_logging', None)
if _original_get_compile_options is not None:
  def _get_compile_options(*args, env_options_overrides=None, **kwargs):
    optimized = not jax.config.read('jax_disable_most_optimizations')
    straight_line, _program.straight_line = getattr(_program, 'straight_line', False), False
    if optimized and not straight_line:
      return _original_get_compile_options(*args, env_options_overrides=env_options_overrides,
                                           **kwargs)
    options = _original_get_compile_options(
        *args, env_options_overrides={**LOW_EFFORT_XLA_OPTIONS, **(env_options_overrides or {})},
        **kwargs)
    # What jax_disable_most_optimizations sets, for a straight-line program in an optimized test.
    debug = options.executable_build_options.debug_options
    debug.xla_backend_optimization_level = 0
    debug.xla_llvm_disable_expensive_passes = True
    return options
  _jax_compiler.get_compile_options = _get_compile_options

  if _original_use_detailed_logging is not None:
    def _use_detailed_logging(module):
      _program.straight_line = (not jax.config.read('jax_disable_most_optimizations')
                                and not _has_loop(module))
      return _original_use_detailed_logging(module)
    _jax_compiler.use_detailed_logging = _use_detailed_logging

jax.config.update('jax_numpy_rank_promotion', 'raise')

# (variable, owner variable) of each directory made for one test run (below).
_RUN_DIRECTORIES = []


def _run_directory(variable: str, owner: str, prefix: str) -> str:
  """The test run's directory named by $variable. The first process of the run (pytest
  itself) makes it and is its owner; the xdist workers and the processes the tests start
  inherit the environment and use the same one. The owner removes it (pytest_unconfigure)."""
  _RUN_DIRECTORIES.append((variable, owner))
  if variable not in os.environ:
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    os.environ[owner] = str(os.getpid())
  return os.environ[variable]


# One persistent compilation cache per test run, shared by the xdist workers and by the
# processes the tests start: many tests build the same program (a toy train step, a
# sampler) through fresh closures, which JAX would otherwise compile again each time. It
# keys on the program: no result changes.
jax.config.update('jax_compilation_cache_dir', _run_directory(
    'JAX_COMPILATION_CACHE_DIR', 'SCORE_SDE_TEST_CACHE_OWNER', 'score_sde_test_jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))

jax.config.update('jax_disable_most_optimizations', _LOW_EFFORT)


@pytest.fixture(autouse=True)
def _xla_optimization(request, monkeypatch):
  """Full XLA optimization for tests marked ``optimized`` (and the processes they start)."""
  if not _LOW_EFFORT or request.node.get_closest_marker('optimized') is None:
    yield
    return
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '0')
  monkeypatch.setenv('XLA_FLAGS', _xla_flags(False))
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', True)


def pytest_unconfigure(config):
  """The process that made the run's cache or data directory (pytest itself, not an xdist
  worker) removes it."""
  for directory, owner in _RUN_DIRECTORIES:
    if os.environ.get(owner) == str(os.getpid()):
      shutil.rmtree(os.environ[directory], ignore_errors=True)

import gaussian_mixture  # noqa: E402
import sde_lib  # noqa: E402

SDE_NAMES = ('vesde', 'vpsde', 'subvpsde')


@pytest.fixture
def x64():
  """Runs a test in float64, restoring float32 afterwards.

  Compiled functions are dropped on both sides of the switch, so that nothing traced in
  one precision is reused in the other (x64 is meant to be set once, at start-up).
  """
  jax.clear_caches()
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', False)
    jax.clear_caches()


# One directory for the embedded datasets (toy, digits, photos) per test run, shared like the
# compilation cache: each is generated once, not once per xdist worker (a toy distribution's
# 60,000 points take 4 s to write). Workers that generate one at the same moment are what
# datasets.py handles for hosts on one disk: the copy renamed into place first is used.
_DATA_DIR = _run_directory('SCORE_SDE_TEST_DATA_DIR', 'SCORE_SDE_TEST_DATA_OWNER',
                           'score_sde_test_data_')


@pytest.fixture(scope='session')
def data_dir():
  """Where the embedded datasets are generated once for the whole run (all workers)."""
  return _DATA_DIR


@pytest.fixture(scope='session')
def mixture():
  return gaussian_mixture.two_dimensional_example()


def mixture_statistics(mix, x):
  """Mode weights [K], per-mode means [K, D] and covariances [K, D, D] of samples x."""
  labels = np.asarray(mix.assign(jax.numpy.asarray(x, jax.numpy.float32)))
  x = np.asarray(x, np.float64)
  k = mix.weights.shape[0]
  weights = np.bincount(labels, minlength=k) / len(labels)
  means = np.stack([x[labels == i].mean(0) for i in range(k)])
  covs = np.stack([np.cov(x[labels == i].T) for i in range(k)])
  return weights, means, covs


def assert_matches_mixture(mix, x, weight_tol, mean_tol, cov_tol):
  assert np.all(np.isfinite(np.asarray(x))), 'samples contain NaN or inf'
  weights, means, covs = mixture_statistics(mix, x)
  np.testing.assert_allclose(weights, np.asarray(mix.weights), atol=weight_tol, err_msg='mode weights')
  np.testing.assert_allclose(means, np.asarray(mix.means), atol=mean_tol, err_msg='mode means')
  np.testing.assert_allclose(covs, np.asarray(mix.covs), atol=cov_tol, err_msg='mode covariances')


def make_sde(name, **kwargs):
  return sde_lib.get_sde(name, **kwargs)
