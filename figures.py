"""The tutorial's figures: the blog post's story told by the library, one function per figure.

docs/tutorial.ipynb calls these functions step by step and scripts/make_figures.py calls the
same ones to write docs/figures/*.png, so the notebook and the pictures cannot drift apart.
Each figure function computes with the library (scores, samplers, likelihoods, posterior
samplers) and returns a ``Shown``: a matplotlib Figure (made without pyplot, so nothing
accumulates) and the numbers it shows. The few training helpers train small models through
the library's own losses, train step and configs.

Sizes (training steps, sample counts) are arguments: the notebook's parameter cell sets them,
and the tests run everything small.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

import builder
import controllable_generation as cg
import datasets
import eval_lib
import gaussian_mixture
import likelihood
import run_lib
import sampling
import sde_lib
import train_lib
from models.mlp import ScoreMLP


class Shown(NamedTuple):
  """A figure and the numbers it shows (what the notebook prints and the tests check)."""
  figure: Figure
  numbers: dict


class Trained(NamedTuple):
  """A model trained through the library: its config, components, parameters and score."""
  config: Any
  comp: Any
  params: Any
  score_fn: Callable      # score_fn(x, t)


# The figures, in the tutorial's order: docs/figures/<name>.png.
FIGURE_NAMES = ('score_field', 'langevin_exact_score', 'naive_score_matching',
                'langevin_naive_score', 'perturbed_densities', 'annealed_langevin',
                'sde_trajectories', 'ode_tolerances', 'fast_samplers', 'likelihood',
                'latent_interpolation', 'identifiability', 'class_conditional', 'inpainting',
                'inverse_ct')


def save(shown: Shown, name: str, out_dir: str) -> str:
  """Writes the figure as <out_dir>/<name>.png (atomically); returns the path."""
  if name not in FIGURE_NAMES:
    raise ValueError(f'unknown figure {name!r}; valid: {list(FIGURE_NAMES)}')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name + '.png')
  shown.figure.savefig(path + '.tmp.png', dpi=110)
  os.replace(path + '.tmp.png', path)
  return path


MIXTURE = gaussian_mixture.two_dimensional_example()
LIMITS = (-4.5, 4.5)

# The tutorial's sizes, in one place for docs/tutorial.ipynb and scripts/make_figures.py.
# 'full' makes the committed notebook and docs/figures (minutes on 2 CPU cores; a paper-size
# run trains for hours on accelerators); 'small' runs everything in seconds for the tests
# (the pictures then show untrained models).
SIZES = {
    'full': dict(
        n=2000,                      # samples per toy picture
        naive_steps=2000,            # score matching on clean data
        toy_steps=4000,              # the noise-conditional toy model (configs/toy/mixture_ve.py)
        langevin_steps=1000,
        ald_levels=10, ald_steps_each=100,
        trajectory_points=500, trajectory_steps=500,
        pc_steps=1000, fast_steps=(10, 20),
        likelihood_grid=40, likelihood_test=500,
        digits_steps=3000,           # each of the two digits models (configs/vp/digits.py)
        digits_a=dict(),             # the first model: digits_config's defaults
        digits_b=dict(seed=1, nf=32),   # the second model: another seed, a wider network
        num_scales=200,              # PC and posterior-sampler steps on digits
        classifier_steps=1500,
        per_class=6, latent_examples=32, interpolation=8,
        inverse_examples=4, samples_per_example=4,
        cg_iters=20,                 # moment matching's conjugate-gradient iterations
    ),
    'small': dict(
        n=200, naive_steps=50, toy_steps=100, langevin_steps=50, ald_levels=4, ald_steps_each=5,
        trajectory_points=50, trajectory_steps=20, pc_steps=20, fast_steps=(4,),
        likelihood_grid=8, likelihood_test=20, digits_steps=20,
        # One narrow network for both models (seeds differ): the second trains from the first's
        # compiled program. The full size shows two architectures.
        digits_a=dict(nf=16), digits_b=dict(seed=1, nf=16),
        num_scales=25,   # VP's discrete chain needs N >= beta_max = 20 (beta_max / N <= 1)
        classifier_steps=10, per_class=1, latent_examples=2, interpolation=3,
        inverse_examples=1, samples_per_example=2, cg_iters=5,
    ),
}


# -----------------------------------------------------------------------------
# Small helpers: a grid over the plane, densities, mode weights, distances.
# -----------------------------------------------------------------------------


def figure_key(name: str, seed: int = 0) -> jax.Array:
  """Each figure's own random stream, named: PRNGKey(seed) folded with a hash of the name."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def plane_grid(n: int = 60, limits=LIMITS):
  """Points of an n x n grid over the square ``limits``^2: (xs, ys, points [n * n, 2])."""
  xs = np.linspace(*limits, n, dtype=np.float32)
  gx, gy = np.meshgrid(xs, xs)
  return gx, gy, np.stack([gx.ravel(), gy.ravel()], -1)


def mode_weights(x, mix=MIXTURE):
  """Share of samples that each component of the mixture is most responsible for."""
  labels = np.asarray(mix.assign(jnp.asarray(x, jnp.float32)))
  return np.bincount(labels, minlength=mix.weights.shape[0]) / len(labels)


def energy_distance(x, y):
  """Energy distance of two sample sets (eval_lib's, the toy report's metric)."""
  return float(eval_lib.energy_distance(np.asarray(x, np.float32), np.asarray(y, np.float32)))


def _density_axes(ax, mix=MIXTURE, n=120):
  gx, gy, pts = plane_grid(n)
  logp = np.asarray(mix.log_prob(jnp.asarray(pts))).reshape(gx.shape)
  ax.contourf(gx, gy, np.exp(logp), levels=20, cmap='Blues')
  ax.set_xlim(*LIMITS)
  ax.set_ylim(*LIMITS)
  ax.set_aspect('equal')
  ax.set_xticks([])
  ax.set_yticks([])


def _scatter(ax, x, title, mix=MIXTURE, color='tab:red'):
  _density_axes(ax, mix)
  x = np.asarray(x)
  ax.scatter(x[:, 0], x[:, 1], s=2, c=color, alpha=0.5)
  ax.set_title(title, fontsize=9)


def _weights_text(w):
  return '[' + ', '.join(f'{v:.2f}' for v in w) + ']'


# -----------------------------------------------------------------------------
# Training helpers (the library's losses, train step and configs; small sizes).
# -----------------------------------------------------------------------------


def train_naive_score(key, steps: int = 2000, batch: int = 256, hidden=(128, 128), lr=2e-3,
                      mix=MIXTURE):
  """A network s(x) trained by (Hyvärinen) score matching on clean data, no noise at all.

  ``losses.exact_score_matching`` at t = 0: the model is never asked about a noise level.
  Returns ``score_fn(x, t)`` (t ignored).
  """
  import losses
  model = ScoreMLP(hidden=tuple(hidden))
  k_init, k_train = jax.random.split(key)
  params = model.init(k_init, jnp.zeros((1, 2)), jnp.zeros((1,)))
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def score(params, x, t):
    return model.apply(params, x, jnp.zeros_like(t))

  @jax.jit
  def fit(params):
    def step(carry, key):
      params, opt_state = carry
      x = mix.sample(key, batch)
      objective = lambda p: jnp.mean(losses.exact_score_matching(
          functools.partial(score, p), x, jnp.zeros(x.shape[:1])))
      grads = jax.grad(objective)(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                  jax.random.split(k_train, steps))
    return params

  return jax.tree_util.Partial(score, fit(params))


def toy_config(sde: str = 'vesde', steps: int = 4000, seed: int = 0, hidden=(128, 128, 128)):
  """configs/toy/mixture.py (VP) or mixture_ve.py (VE) with the given steps, seed and widths."""
  from configs.toy import mixture, mixture_ve
  config = (mixture_ve if sde == 'vesde' else mixture).get_config()
  if sde == 'subvpsde':
    from configs import base
    base.set_sde(config, 'subvpsde')
  config.training.n_iters = steps
  config.seed = seed
  config.model.hidden = tuple(hidden)
  return config


def train_toy(config, mix=MIXTURE, steps_per_call: int = 50) -> Trained:
  """Trains the toy config's model on fresh mixture samples, in memory (no workdir).

  The same components and train step as ``python main.py --mode train`` (builder,
  train_lib), with batches drawn from the mixture itself.
  """
  data_std = float(np.std(np.asarray(mix.sample(jax.random.PRNGKey(12345), 10_000))))
  comp = builder.build_components(config, (2,), data_std)
  state = train_lib.init_state(config, comp)
  step = jax.jit(train_lib.make_train_step(comp, config.model.ema_rate, unroll=False,
                                           ema_warmup=config.model.ema_warmup))
  key = train_lib.train_key(config)
  data_key = builder.stream_key(config.seed, 'data')
  bs = config.training.batch_size
  for call in range(math.ceil(config.training.n_iters / steps_per_call)):
    n = min(steps_per_call, config.training.n_iters - call * steps_per_call)
    x = mix.sample(jax.random.fold_in(data_key, call), n * bs).reshape(n, bs, 2)
    state, _ = step(state, {'x': x}, key)
  return Trained(config, comp, state.ema_params, comp.score_fn(state.ema_params))


def train_workdir(config, workdir: str) -> Trained:
  """``python main.py --mode train`` for ``config`` into ``workdir`` (resumes if it holds a
  checkpoint), then the trained EMA parameters and their score."""
  run_lib.run(config, workdir, 'train')
  comp = builder.build(config)
  state, _ = eval_lib.restore_for_eval(config, comp, workdir)
  return Trained(config, comp, state.ema_params, comp.score_fn(state.ema_params))


def digits_config(sde: str = 'vpsde', steps: int = 2000, seed: int = 0, nf: int = 24,
                  num_res_blocks: int = 1, batch_size: int = 64, num_scales: int = 200):
  """configs/<sde>/digits.py with the given steps, seed and width (the tutorial's digits)."""
  import importlib
  short = {'vesde': 've', 'vpsde': 'vp', 'subvpsde': 'subvp'}[sde]
  config = importlib.import_module(f'configs.{short}.digits').get_config()
  config.training.update(n_iters=steps, batch_size=batch_size, snapshot_freq=steps,
                         snapshot_sampling=False, log_freq=max(1, steps // 10),
                         preemption_freq=max(1, steps // 2))
  config.optim.warmup = min(config.optim.warmup, steps // 5)
  config.seed = seed
  config.model.update(nf=nf, num_res_blocks=num_res_blocks)
  config.sde.num_scales = num_scales
  return config


def train_classifier(trained: Trained, workdir: str, steps: int):
  """``--mode train_classifier`` in the model's workdir; returns the classifier's
  ``log_prob_fn(x_t, t)`` (classifier_lib), the input of class guidance."""
  import classifier_lib
  config = trained.config.copy_and_resolve_references()   # the model's config is left as it is
  config.classifier.n_iters = steps
  config.classifier.checkpoint_freq = max(1, steps // 2)
  run_lib.run(config, workdir, 'train_classifier')
  return classifier_lib.load_classifier(config, trained.comp, workdir)


def tutorial_workdir(name: str) -> str:
  """A directory for the tutorial's runs ($SCORE_SDE_TUTORIAL_DIR, or a temporary one)."""
  root = os.environ.get('SCORE_SDE_TUTORIAL_DIR') or os.path.join(tempfile.gettempdir(),
                                                                  'score_sde_tutorial')
  path = os.path.join(root, name)
  os.makedirs(path, exist_ok=True)
  return path


def exact_clean_score(mix=MIXTURE):
  """The mixture's own score grad log p(x) as ``score_fn(x, t)`` (t ignored): no noise."""
  def score(x, t):
    ones = jnp.ones(x.shape[:1], x.dtype)
    return mix.score_at(x, ones, 0 * ones)
  return score


# -----------------------------------------------------------------------------
# 1. Scores and Langevin dynamics.
# -----------------------------------------------------------------------------


def score_field(mix=MIXTURE, n: int = 21) -> Shown:
  """The score of the mixture, grad log p(x), as arrows over its density."""
  gx, gy, pts = plane_grid(n)
  s = np.asarray(mix.score_at(jnp.asarray(pts), jnp.ones(len(pts)), jnp.zeros(len(pts))))
  s = s / (1.0 + np.linalg.norm(s, axis=-1, keepdims=True))   # arrows of readable length
  fig = Figure(figsize=(4, 4))
  ax = fig.subplots()
  _density_axes(ax, mix)
  ax.quiver(gx.ravel(), gy.ravel(), s[:, 0], s[:, 1], color='k', width=0.004)
  ax.set_title('density and score of a 3-Gaussian mixture', fontsize=9)
  fig.tight_layout()
  return Shown(fig, {'true_weights': np.asarray(mix.weights).tolist()})


def langevin_from_score(key, score_fn, n: int = 2000, step_size: float = 0.01,
                        n_steps: int = 1000, mix=MIXTURE, title='Langevin dynamics') -> Shown:
  """Langevin dynamics from uniform noise with a time-independent score: samples and the
  share of each mode, beside the mixture's weights."""
  k_init, k_run = jax.random.split(key)
  x0 = jax.random.uniform(k_init, (n, 2), minval=LIMITS[0] + 1, maxval=LIMITS[1] - 1)
  x, nfe = sampling.langevin_dynamics(score_fn, k_run, x0, step_size, n_steps)
  w = mode_weights(x, mix)
  fig = Figure(figsize=(4, 4))
  ax = fig.subplots()
  _scatter(ax, x, f'{title}\nmode shares {_weights_text(w)}\ntrue {_weights_text(mix.weights)}')
  fig.tight_layout()
  return Shown(fig, {'mode_weights': w.tolist(), 'true_weights': np.asarray(mix.weights).tolist(),
                     'nfe': int(nfe), 'samples': np.asarray(x)})


def naive_score_error(naive_score, mix=MIXTURE, n: int = 21) -> Shown:
  """The score learned on clean data against the true one: arrows, and the error over the
  plane. Accurate where the data are, wrong in the low-density regions between the modes."""
  gx, gy, pts = plane_grid(n)
  pts_j = jnp.asarray(pts)
  zeros = jnp.zeros(len(pts))
  true = np.asarray(mix.score_at(pts_j, zeros + 1, zeros))
  learned = np.asarray(naive_score(pts_j, zeros))
  density = np.exp(np.asarray(mix.log_prob(pts_j)))
  err = np.linalg.norm(learned - true, axis=-1) / (1 + np.linalg.norm(true, axis=-1))
  high = density > np.quantile(density, 0.9)   # the top 10% of the grid by density
  low = density < 1e-3
  fig = Figure(figsize=(12, 4))
  axes = fig.subplots(1, 3)
  for ax, s, title in ((axes[0], true, 'true score'), (axes[1], learned, 'learned on clean data')):
    _density_axes(ax, mix)
    v = s / (1.0 + np.linalg.norm(s, axis=-1, keepdims=True))
    ax.quiver(gx.ravel(), gy.ravel(), v[:, 0], v[:, 1], color='k', width=0.004)
    ax.set_title(title, fontsize=9)
  image = axes[2].imshow(err.reshape(gx.shape), origin='lower', extent=LIMITS * 2, cmap='magma')
  axes[2].contour(gx, gy, density.reshape(gx.shape), levels=4, colors='w', linewidths=0.6)
  axes[2].set_xticks([])
  axes[2].set_yticks([])
  axes[2].set_title('relative error |learned - true| / (1 + |true|)\n(white: density contours)',
                    fontsize=9)
  fig.colorbar(image, ax=axes[2], fraction=0.046)
  fig.tight_layout()
  return Shown(fig, {'relative_error_high_density': float(err[high].mean()),
                     'relative_error_low_density': float(err[low].mean())})


# -----------------------------------------------------------------------------
# 2. Noise-conditional scores and annealed Langevin dynamics (NCSN).
# -----------------------------------------------------------------------------


def perturbed_densities(sigmas=(0.1, 0.5, 1.0, 2.0), mix=MIXTURE) -> Shown:
  """The mixture perturbed by Gaussian noise of growing sigma (the VE marginals p_sigma)."""
  sde = sde_lib.VESDE(sigma_min=min(sigmas), sigma_max=max(sigmas))
  gx, gy, pts = plane_grid(100)
  fig = Figure(figsize=(3 * len(sigmas), 3))
  axes = fig.subplots(1, len(sigmas))
  for ax, sigma in zip(axes, sigmas):
    t = float(np.log(sigma / sde.sigma_min) / np.log(sde.sigma_max / sde.sigma_min))
    logp = mix.perturbed_log_prob(sde, jnp.asarray(pts), jnp.full(len(pts), t))
    ax.contourf(gx, gy, np.exp(np.asarray(logp)).reshape(gx.shape), levels=20, cmap='Blues')
    ax.set_aspect('equal')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f'sigma = {sigma:g}', fontsize=9)
  fig.tight_layout()
  return Shown(fig, {})


def sigma_conditioned(trained: Trained) -> Callable:
  """The VE model's score as NCSN's s(x, sigma): t is the time at which sigma(t) = sigma."""
  sde = trained.comp.sde
  lo, hi = sde.sigma_min, sde.sigma_max

  def score(x, sigma):
    return trained.score_fn(x, jnp.log(sigma / lo) / math.log(hi / lo))
  return score


def annealed_langevin(key, trained: Trained, n: int = 2000, num_levels: int = 10,
                      n_steps_each: int = 100, step_lr: float = 2e-5, sigma_min: float = 0.01,
                      mix=MIXTURE) -> Shown:
  """NCSN's annealed Langevin dynamics on the noise-conditional (VE) model: the mode shares
  come out right where Langevin on a single noise level got them wrong."""
  sde = trained.comp.sde
  sigmas = sampling.geometric_sigmas(sde.sigma_max, sigma_min, num_levels)
  k_init, k_run = jax.random.split(key)
  x0 = jax.random.uniform(k_init, (n, 2), minval=LIMITS[0], maxval=LIMITS[1])
  x, nfe = sampling.annealed_langevin_dynamics(sigma_conditioned(trained), k_run, x0, sigmas,
                                               n_steps_each, step_lr, denoise=True)
  w = mode_weights(x, mix)
  truth = mix.sample(jax.random.PRNGKey(7), n)
  fig = Figure(figsize=(4, 4))
  ax = fig.subplots()
  _scatter(ax, x, f'annealed Langevin, {num_levels} levels ({nfe} NFE)\nmode shares '
                  f'{_weights_text(w)}\ntrue {_weights_text(mix.weights)}')
  fig.tight_layout()
  return Shown(fig, {'mode_weights': w.tolist(), 'nfe': int(nfe),
                     'energy_distance': energy_distance(x, truth)})


# -----------------------------------------------------------------------------
# 3. The SDE view: forward, reverse SDE and probability-flow ODE trajectories.
# -----------------------------------------------------------------------------


def sde_for(name: str) -> sde_lib.SDE:
  """The tutorial's SDEs: VE (sigma_max 10, covering the mixture's spread), VP and sub-VP."""
  if name == 'vesde':
    return sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=1000)
  return sde_lib.SDES[name](N=1000)


def trajectories(sde: sde_lib.SDE, key, x, score_fn, *, direction: str, n_steps: int = 500,
                 eps: float = 1e-3):
  """Paths [n_steps + 1, batch, 2] of the forward SDE from x (t: eps -> T), the reverse SDE
  or the probability-flow ODE from x (T -> eps), by the SDE's own Euler–Maruyama steps."""
  ts = jnp.linspace(eps, sde.T, n_steps + 1)
  dt = (sde.T - eps) / n_steps
  if direction == 'forward':
    process, times, sign = sde, ts[:-1], 1.0
  else:
    process = sde.reverse(score_fn, probability_flow=direction == 'ode')
    times, sign = ts[::-1][:-1], -1.0
  stochastic = direction != 'ode'

  def step(x, inputs):
    t, key = inputs
    tb = jnp.full(x.shape[:1], t)
    drift, diffusion = process.sde(x, tb)
    noise = jax.random.normal(key, x.shape) if stochastic else 0.0
    x = x + sign * drift * dt + sde_lib.batch_broadcast(diffusion, x) * jnp.sqrt(dt) * noise
    return x, x

  _, path = jax.lax.scan(step, x, (times, jax.random.split(key, n_steps)))
  return jnp.concatenate([x[None], path])


def sde_trajectories(key, mix=MIXTURE, n_paths: int = 8, n_points: int = 500,
                     n_steps: int = 500) -> Shown:
  """For VE, VP and sub-VP (rows): the forward SDE from data to noise, the reverse SDE and the
  probability-flow ODE from noise back to data (columns), with the exact score of the mixture.

  Each panel plots the first coordinate against t; the grey cloud is the end points of
  ``n_points`` paths and the lines are ``n_paths`` of them."""
  fig = Figure(figsize=(10, 8))
  axes = fig.subplots(3, 3, sharex=True)
  numbers = {}
  for row, name in enumerate(('vesde', 'vpsde', 'subvpsde')):
    sde = sde_for(name)
    score_fn = mix.score_fn(sde)
    k_data, k_prior, k_f, k_r, k_o = jax.random.split(jax.random.fold_in(key, row), 5)
    x0 = mix.sample(k_data, n_points)
    prior = sde.prior_sampling(k_prior, (n_points, 2))
    ts = np.linspace(1e-3, sde.T, n_steps + 1)
    for col, (direction, start, k) in enumerate((('forward', x0, k_f), ('sde', prior, k_r),
                                                 ('ode', prior, k_o))):
      path = np.asarray(trajectories(sde, k, start, score_fn, direction=direction,
                                     n_steps=n_steps))
      t_axis = ts if direction == 'forward' else ts[::-1]
      ax = axes[row, col]
      ax.plot(t_axis, path[:, :n_paths, 0], lw=0.8)
      ax.scatter(np.full(n_points, t_axis[-1]), path[-1, :, 0], s=1, c='grey', alpha=0.3)
      if row == 0:
        ax.set_title({'forward': 'forward SDE (data -> noise)', 'sde': 'reverse SDE',
                      'ode': 'probability-flow ODE'}[direction], fontsize=9)
      if col == 0:
        ax.set_ylabel(f'{name}: x[0]')
      if row == 2:
        ax.set_xlabel('t')
      if direction != 'forward':
        numbers[f'{name}_{direction}_mode_weights'] = mode_weights(path[-1], mix).tolist()
  fig.tight_layout()
  return Shown(fig, numbers)


# -----------------------------------------------------------------------------
# 4. Sampling speed: the adaptive ODE at several tolerances, the few-step solvers.
# -----------------------------------------------------------------------------


def ode_tolerances(key, trained: Trained, tolerances=(1e-1, 1e-3, 1e-5), n: int = 2000,
                   mix=MIXTURE) -> Shown:
  """The probability-flow ODE solved adaptively at several tolerances: samples and NFE."""
  sde = trained.comp.sde
  truth = mix.sample(jax.random.PRNGKey(7), n)
  fig = Figure(figsize=(4 * len(tolerances), 4))
  axes = fig.subplots(1, len(tolerances))
  numbers = {}
  for ax, tol in zip(axes, tolerances):
    sampler = sampling.get_sampler('ode', sde, (n, 2), rtol=tol, atol=tol,
                                   eps=trained.config.sampling.eps)
    x, nfe = sampler(key, trained.score_fn)
    ed = energy_distance(x, truth)
    numbers[f'{tol:g}'] = {'nfe': int(nfe), 'energy_distance': ed}
    _scatter(ax, x, f'ODE, tolerance {tol:g}: {int(nfe)} NFE\nenergy distance {ed:.4f}')
  fig.tight_layout()
  return Shown(fig, numbers)


FAST = ('ddim', 'heun', 'dpm_solver_2m', 'unipc')


def fast_samplers(key, sde_name: str = 'vpsde', steps=(10, 20), n: int = 2000,
                  pc_steps: int = 1000, mix=MIXTURE) -> Shown:
  """The few-step solvers at ``steps`` against PC at ``pc_steps`` (with a Langevin corrector),
  all with the exact score: energy distance to fresh mixture samples, and the floor (two
  independent true sets)."""
  sde = sde_for(sde_name)
  score_fn = mix.score_fn(sde)
  truth = mix.sample(jax.random.PRNGKey(7), n)
  floor = energy_distance(mix.sample(jax.random.PRNGKey(8), n), truth)
  pc = sampling.get_sampler('pc', sde, (n, 2), steps=pc_steps, predictor='reverse_diffusion',
                            corrector='langevin', snr=0.16)
  x_pc, nfe_pc = pc(key, score_fn)
  rows = {'pc': {'nfe': int(nfe_pc), 'energy_distance': energy_distance(x_pc, truth)}}
  fig = Figure(figsize=(3 * (len(FAST) + 1), 3.2))
  axes = fig.subplots(1, len(FAST) + 1)
  _scatter(axes[0], x_pc, f'PC, {int(nfe_pc)} NFE\nED {rows["pc"]["energy_distance"]:.4f}')
  for ax, name in zip(axes[1:], FAST):
    for m in steps:
      x, nfe = sampling.get_sampler(name, sde, (n, 2), steps=m)(key, score_fn)
      rows[f'{name}_{m}'] = {'nfe': int(nfe), 'energy_distance': energy_distance(x, truth)}
    r = rows[f'{name}_{steps[-1]}']
    _scatter(ax, x, f'{name}, {r["nfe"]} NFE\nED {r["energy_distance"]:.4f}')
  fig.suptitle(f'{sde_name}, exact score; energy distance floor (two true sets) {floor:.4f}',
               fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.88))
  return Shown(fig, {'rows': rows, 'floor': floor})


# -----------------------------------------------------------------------------
# 5. Exact likelihood.
# -----------------------------------------------------------------------------


def likelihood_grid(key, trained: Trained, n: int = 40, n_test: int = 500,
                    mix=MIXTURE) -> Shown:
  """The model's log-density through the probability-flow ODE (exact divergence, 2-D) on a
  grid beside the true one, and the test log-likelihood and bits/dim of both."""
  sde = trained.comp.sde
  eps = trained.config.sampling.eps
  lik = likelihood.get_likelihood_fn(sde, hutchinson_type='exact', eps=eps)
  gx, gy, pts = plane_grid(n)
  model_logp = np.asarray(lik(key, trained.score_fn, jnp.asarray(pts)).logp).reshape(gx.shape)
  t_eps = jnp.full(len(pts), eps)
  true_logp = np.asarray(mix.perturbed_log_prob(sde, jnp.asarray(pts), t_eps)).reshape(gx.shape)
  test = mix.sample(jax.random.PRNGKey(11), n_test)
  res = lik(key, trained.score_fn, test)
  true_test = mix.perturbed_log_prob(sde, test, jnp.full(n_test, eps))
  numbers = {'model_test_logp': float(jnp.mean(res.logp)),
             'true_test_logp': float(jnp.mean(true_test)),
             'model_bits_per_dim': float(jnp.mean(res.bpd)),
             'true_bits_per_dim': float(-jnp.mean(true_test) / (2 * math.log(2))),
             'nfe': int(res.nfe)}
  fig = Figure(figsize=(8, 4))
  axes = fig.subplots(1, 2)
  levels = np.linspace(-12, max(true_logp.max(), model_logp.max()), 25)
  for ax, z, title in ((axes[0], true_logp, 'true log p'),
                       (axes[1], model_logp, 'model log p (probability-flow ODE)')):
    ax.contourf(gx, gy, np.maximum(z, -12), levels=levels, cmap='viridis')
    ax.set_aspect('equal')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
  fig.suptitle(f'test log-likelihood: model {numbers["model_test_logp"]:.3f}, true '
               f'{numbers["true_test_logp"]:.3f} nats ({numbers["model_bits_per_dim"]:.3f} vs '
               f'{numbers["true_bits_per_dim"]:.3f} bits/dim)', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.88))
  return Shown(fig, numbers)


# -----------------------------------------------------------------------------
# 6. Latent codes and identifiability (digits).
# -----------------------------------------------------------------------------


def slerp(z0, z1, alphas):
  """Spherical interpolation between latents z0 and z1 (flattened), at each alpha.

  Latents at (nearly) the same direction interpolate linearly (the limit of slerp as
  omega -> 0); opposite latents (no unique great circle) and a zero latent raise."""
  a, b = np.ravel(z0), np.ravel(z1)
  norms = np.linalg.norm(a) * np.linalg.norm(b)
  if norms == 0:
    raise ValueError('slerp: a zero latent has no direction to interpolate along')
  omega = np.arccos(np.clip(a @ b / norms, -1, 1))
  if np.pi - omega < 1e-6:
    raise ValueError('slerp: opposite latents have no unique great circle between them')
  if omega < 1e-6:
    out = [(1 - t) * a + t * b for t in alphas]
  else:
    out = [(np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega) for t in alphas]
  return np.stack(out).reshape((len(alphas),) + np.shape(z0))


def _images_row(axes, images, titles=None):
  for i, ax in enumerate(axes):
    ax.imshow(np.clip(np.asarray(images[i])[..., 0], 0, 1), cmap='gray', vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if titles is not None:
      ax.set_title(titles[i], fontsize=8)


def latent_interpolation(trained: Trained, x_pair, n: int = 8) -> Shown:
  """Encode two digits with the probability-flow ODE, interpolate their latents (slerp),
  decode: every point along the way is a digit-like image. Also the round trip's error."""
  sde = trained.comp.sde
  eps = trained.config.sampling.eps
  x_pair = jnp.asarray(x_pair)
  z, nfe_enc = likelihood.encode(sde, trained.score_fn, x_pair, eps=eps)
  x_back, _ = likelihood.decode(sde, trained.score_fn, z, eps=eps)
  alphas = np.linspace(0, 1, n)
  zs = jnp.asarray(slerp(np.asarray(z[0]), np.asarray(z[1]), alphas))
  xs, nfe_dec = likelihood.decode(sde, trained.score_fn, zs, eps=eps)
  fig = Figure(figsize=(1.2 * n, 1.6))
  _images_row(fig.subplots(1, n, squeeze=False)[0],
              datasets.to_unit_range(xs, trained.config.data.centered),
              [f'{a:.2f}' for a in alphas])
  fig.suptitle('decoded slerp between the latents of two test digits', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.88))
  return Shown(fig, {'round_trip_rms': float(jnp.sqrt(jnp.mean((x_back - x_pair)**2))),
                     'nfe_encode': int(nfe_enc), 'nfe_decode': int(nfe_dec)})


def latent_agreement(z_a, z_b):
  """How closely two models' latents of the same inputs agree, against those of different inputs.

  Returns (same, different): the RMS distance between z_a[i] and z_b[i] (same input, two
  models), and the RMS distance between z_a[i] and z_a[j] over pairs i != j (one model,
  different inputs). Identifiable codes have same << different.
  """
  z_a = np.asarray(z_a, np.float64).reshape(len(z_a), -1)
  z_b = np.asarray(z_b, np.float64).reshape(len(z_b), -1)
  same = np.sqrt(np.mean(np.sum((z_a - z_b)**2, -1)))
  d2 = np.sum((z_a[:, None] - z_a[None])**2, -1)
  off = ~np.eye(len(z_a), dtype=bool)
  different = np.sqrt(np.mean(d2[off]))
  return float(same), float(different)


def identifiability(model_a: Trained, model_b: Trained, x, n_show: int = 3) -> Shown:
  """The latents of the same inputs under two separately trained models (different seeds and
  widths, the same SDE): they nearly coincide, while different inputs' latents are far apart
  (the SDE paper's figure 7)."""
  sde = model_a.comp.sde
  eps = model_a.config.sampling.eps
  x = jnp.asarray(x)
  z_a, _ = likelihood.encode(sde, model_a.score_fn, x, eps=eps)
  z_b, _ = likelihood.encode(sde, model_b.score_fn, x, eps=eps)
  same, different = latent_agreement(z_a, z_b)
  fig = Figure(figsize=(9, 2.6))
  n_show = min(n_show, len(x))
  axes = fig.subplots(1, n_show, squeeze=False)[0]
  d = min(64, int(np.prod(z_a.shape[1:])))
  for i, ax in enumerate(axes):
    ax.plot(np.ravel(z_a[i])[:d], label='model A', lw=1)
    ax.plot(np.ravel(z_b[i])[:d], '--', label='model B', lw=1)
    ax.set_title(f'test digit {i}: first {d} latent dims', fontsize=8)
  axes[0].legend(fontsize=7)
  fig.suptitle(f'latent RMS distance, same input across models {same:.2f}; different inputs '
               f'{different:.2f}', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.88))
  return Shown(fig, {'same_input': same, 'different_inputs': different})


# -----------------------------------------------------------------------------
# 7. Controllable generation on digits.
# -----------------------------------------------------------------------------


def class_conditional(key, trained: Trained, log_prob_fn, per_class: int = 6,
                      scale: float = 2.0, sampler: str = 'pc') -> Shown:
  """Class-guided samples, one row per class: the score of p(x | y) built from the
  unconditional score and the noise-conditional classifier's log-probability gradient."""
  import evaluation
  labels = jnp.repeat(jnp.arange(10), per_class)
  score_fn = cg.classifier_guided_score(trained.score_fn, log_prob_fn, labels, scale)
  sample = sampling.get_sampler(sampler, trained.comp.sde, (len(labels),) + trained.comp.data_shape,
                                predictor='reverse_diffusion', corrector='langevin',
                                snr=trained.config.sampling.snr, eps=trained.config.sampling.eps)
  x, nfe = sample(key, score_fn)
  images = evaluation.quantize_samples(datasets.to_unit_range(x, trained.config.data.centered))
  predicted = np.argmax(evaluation.DigitsEvaluator()(images)[1], -1)
  accuracy = float(np.mean(predicted == np.asarray(labels)))
  fig = Figure(figsize=(per_class * 0.9, 10 * 0.9))
  axes = fig.subplots(10, per_class, squeeze=False)
  for k in range(10):
    _images_row(axes[k], images[k * per_class:(k + 1) * per_class] / 255.0)
    axes[k, 0].set_ylabel(str(k), rotation=0, labelpad=10)
  fig.suptitle(f'class guidance, scale {scale:g}: {accuracy:.0%} classified as their row\n'
               f'({int(nfe)} NFE)', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.88))
  return Shown(fig, {'target_accuracy': accuracy, 'nfe': int(nfe)})


def inverse_problem(key, trained: Trained, truth, operator, method: str = 'moment_matching',
                    samples_per_example: int = 4, noise_std: float = 0.0, title: str = '',
                    **options) -> Shown:
  """Posterior samples of digits given a linear measurement y = A x + noise: each row shows
  the truth, the measurement's pseudo-inverse A^+ y, the posterior samples and their
  per-pixel standard deviation (the posterior spread). The method's options default to the
  config's ``inverse`` section, as ``--mode inverse`` reads them (inverse_lib)."""
  import inverse_lib
  sde = trained.comp.sde
  # The method's settings as --mode inverse takes them from the config, then the caller's.
  inv = trained.config.inverse.copy_and_resolve_references()
  inv.method = method
  options = {**inverse_lib.method_options(inv, trained.comp.data_std), **options}
  truth = jnp.asarray(truth)
  n, reps = len(truth), samples_per_example
  if reps < 2:
    raise ValueError(f'samples_per_example={reps}: the posterior spread needs at least 2')
  k_noise, k_sample = jax.random.split(key)
  y = operator.measure(k_noise, truth, noise_std)
  sample = cg.get_inverse_sampler(sde, operator, (n * reps,) + tuple(truth.shape[1:]), method,
                                  noise_std=noise_std, eps=trained.config.sampling.eps, **options)
  x, nfe = sample(k_sample, trained.score_fn, jnp.repeat(y, reps, axis=0))
  # RMSE and spread on the [0, 1] intensity scale, whatever range the model works in.
  to01 = functools.partial(datasets.to_unit_range, centered=trained.config.data.centered)
  x = to01(x).reshape((n, reps) + tuple(truth.shape[1:]))
  truth01, pinv01 = to01(truth), to01(operator.pinv(y))
  spread = x.std(1, ddof=1)   # the sample std: unbiased variance over few samples per example
  mean_rmse = float(np.sqrt(np.mean((x.mean(1) - truth01)**2)))
  pinv_rmse = float(np.sqrt(np.mean((pinv01 - truth01)**2)))
  cols = reps + 3
  fig = Figure(figsize=(cols * 1.0, n * 1.05 + 0.4))
  axes = fig.subplots(n, cols, squeeze=False)
  for i in range(n):
    row = [truth01[i], pinv01[i]] + list(x[i])
    _images_row(axes[i, :-1], row, ['truth', 'A^+ y'] + [f'sample {j + 1}' for j in range(reps)]
                if i == 0 else None)
    axes[i, -1].imshow(spread[i, ..., 0], cmap='magma', vmin=0, vmax=0.5)
    axes[i, -1].set_xticks([])
    axes[i, -1].set_yticks([])
    if i == 0:
      axes[i, -1].set_title('spread', fontsize=8)
  fig.suptitle(f'{title or type(operator).__name__}\n{method}, {int(nfe)} NFE; RMSE: posterior '
               f'mean {mean_rmse:.3f}, A^+ y {pinv_rmse:.3f}', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.88))
  return Shown(fig, {'posterior_mean_rmse': mean_rmse, 'pinv_rmse': pinv_rmse, 'nfe': int(nfe),
                     'mean_spread': float(spread.mean())})


def center_mask(shape, size: int = 4):
  """An inpainting mask [H, W, C] hiding a ``size`` x ``size`` square in the middle."""
  h, w, c = shape
  mask = np.ones(shape, np.float32)
  top, left = (h - size) // 2, (w - size) // 2
  mask[top:top + size, left:left + size] = 0
  return mask
