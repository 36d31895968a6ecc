"""Controllable generation: conditional samples from an unconditional score model.

Bayes' rule for scores (SDE paper, section 5):

  grad_x log p_t(x | y) = grad_x log p_t(x) + grad_x log p_t(y | x).

Everything here builds a score function from score functions, so the samplers of
sampling.py run unchanged: class guidance adds the gradient of a noise-conditional
classifier; the inverse-problem methods handle a measurement y = A x_0 + noise with
a linear operator A, either through a guidance term (DPS, moment matching) or by
constraining the sample after each step (imputation, projection).

Operators are small pytrees acting on batches: ``forward(x [B, *x_shape]) -> y [B,
*y_shape]``, ``adjoint(y) -> x`` and ``pinv(y) -> x`` (the minimum-norm least-squares
solution: closed form where it is cheap, conjugate gradients otherwise).

Tweedie's formulas, used by DPS and moment matching, for p_0t(x_t | x_0) = N(a x_0, s^2 I):
  E[x_0 | x_t]   = (x_t + s^2 grad log p_t(x_t)) / a
  Cov[x_0 | x_t] = (s^2 / a) d E[x_0 | x_t] / d x_t.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import sampling
import sde_lib
from sde_lib import batch_broadcast


# -----------------------------------------------------------------------------
# Class guidance.
# -----------------------------------------------------------------------------


def _classifier_guided(score_fn, log_prob_fn, labels, scale, x, t):
  def log_likelihood(x):
    logp = log_prob_fn(x, t)
    return jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=1))
  return score_fn(x, t) + scale * jax.grad(log_likelihood)(x)


def classifier_guided_score(score_fn, log_prob_fn, labels, scale=1.0):
  """s(x, t) + scale * grad_x log p_t(labels | x): the score of p_t(x | labels) at scale 1.

  Args:
    score_fn: the unconditional ``score_fn(x, t)``.
    log_prob_fn: ``log_prob_fn(x, t) -> [batch, num_classes]`` log-probabilities of a
      noise-conditional classifier.
    labels: ``[batch]`` integer class of each example.
    scale: the guidance scale (> 1 sharpens the class, as in classifier guidance).

  Returns:
    A score function pytree (labels and scale are leaves: new values do not recompile).
  """
  labels = jnp.asarray(labels, jnp.int32)
  if labels.ndim != 1:
    raise ValueError(f'labels must be [batch] class indices, got shape {labels.shape}')
  return jax.tree_util.Partial(_classifier_guided, sde_lib.as_pytree(score_fn),
                               sde_lib.as_pytree(log_prob_fn), labels, jnp.asarray(scale, jnp.float32))


# -----------------------------------------------------------------------------
# Linear measurement operators.
# -----------------------------------------------------------------------------


class LinearOperator:
  """A linear map A on examples of shape ``x_shape``, applied to batches.

  Subclasses list their array attributes in ``_leaves`` and their static ones in
  ``_static`` and define ``forward``; ``adjoint`` defaults to the transpose JAX derives
  from ``forward``, ``pinv`` to conjugate gradients on the normal equations.
  """
  _leaves: tuple = ()
  _static: tuple = ('x_shape',)
  cg_iters: int = 100

  def tree_flatten(self):
    return (tuple(getattr(self, n) for n in self._leaves),
            tuple(getattr(self, n) for n in self._static))

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    obj = object.__new__(cls)
    for name, value in zip(cls._leaves, leaves):
      object.__setattr__(obj, name, value)
    for name, value in zip(cls._static, aux):
      object.__setattr__(obj, name, value)
    return obj

  def _check(self, x):
    if tuple(x.shape[1:]) != tuple(self.x_shape):
      raise ValueError(f'{type(self).__name__} acts on examples of shape {tuple(self.x_shape)}; '
                       f'got a batch of shape {tuple(x.shape)}')

  def forward(self, x):
    raise NotImplementedError

  def adjoint(self, y):
    x = jax.ShapeDtypeStruct((y.shape[0],) + tuple(self.x_shape), y.dtype)
    return jax.linear_transpose(self.forward, x)(y)[0]

  def pinv(self, y):
    """Minimum-norm least squares: CG on A^T A x = A^T y from x = 0 (``cg_iters`` steps)."""
    def one(b):
      normal = lambda v: self.adjoint(self.forward(v[None]))[0]
      return jax.scipy.sparse.linalg.cg(normal, b, maxiter=self.cg_iters, tol=1e-6)[0]
    return jax.vmap(one)(self.adjoint(y))

  def measure(self, key, x, noise_std=0.0):
    """y = A x + noise_std * z."""
    y = self.forward(x)
    if noise_std:
      y = y + noise_std * jax.random.normal(key, y.shape, y.dtype)
    return y

  def project(self, x, y, weight=1.0):
    """x + weight A^+ (y - A x): with weight 1 the nearest x with A x = y (y in the range)."""
    return x + weight * self.pinv(y - self.forward(x))


def _pytree(cls):
  return jax.tree_util.register_pytree_node_class(cls)


def _flat(x):
  return x.reshape(x.shape[0], -1)


@_pytree
class MatrixOperator(LinearOperator):
  """Any matrix A [m, d] acting on the flattened example (d = prod(x_shape)); y is [B, m]."""
  _leaves = ('matrix', 'pinv_matrix')

  def __init__(self, matrix, x_shape=None):
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim != 2:
      raise ValueError(f'MatrixOperator needs a [m, d] matrix, got shape {matrix.shape}')
    self.x_shape = tuple(x_shape) if x_shape is not None else (matrix.shape[1],)
    if math.prod(self.x_shape) != matrix.shape[1]:
      raise ValueError(f'matrix has {matrix.shape[1]} columns but x_shape {self.x_shape} has '
                       f'{math.prod(self.x_shape)} entries')
    self.matrix = jnp.asarray(matrix, jnp.float32)
    self.pinv_matrix = jnp.asarray(np.linalg.pinv(matrix), jnp.float32)

  def forward(self, x):
    self._check(x)
    return _flat(x) @ self.matrix.T

  def adjoint(self, y):
    return (y @ self.matrix).reshape((y.shape[0],) + self.x_shape)

  def pinv(self, y):
    return (y @ self.pinv_matrix.T).reshape((y.shape[0],) + self.x_shape)


def compressed_sensing(key, num_measurements: int, x_shape) -> MatrixOperator:
  """Compressed sensing: m random Gaussian rows with entries N(0, 1/m)."""
  d = math.prod(x_shape)
  a = jax.random.normal(key, (num_measurements, d)) / math.sqrt(num_measurements)
  return MatrixOperator(np.asarray(a), x_shape)


@_pytree
class Inpainting(LinearOperator):
  """Observes the entries where ``mask`` is true: y [B, m] (A A^T = I, A^+ = A^T)."""
  _leaves = ('indices',)

  def __init__(self, mask):
    mask = np.asarray(mask)
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
      raise ValueError('Inpainting mask must hold only 0/1 or booleans')
    self.x_shape = tuple(mask.shape)
    self.indices = jnp.asarray(np.flatnonzero(mask), jnp.int32)

  @property
  def mask(self):
    return jnp.zeros(math.prod(self.x_shape), bool).at[self.indices].set(True).reshape(self.x_shape)

  def forward(self, x):
    self._check(x)
    return _flat(x)[:, self.indices]

  def adjoint(self, y):
    out = jnp.zeros((y.shape[0], math.prod(self.x_shape)), y.dtype).at[:, self.indices].set(y)
    return out.reshape((y.shape[0],) + self.x_shape)

  def pinv(self, y):
    return self.adjoint(y)


def decoupling_matrix(num_channels: int = 3) -> np.ndarray:
  """An orthogonal [C, C] matrix whose first column is 1/sqrt(C): x @ Q has the grey
  level (scaled by sqrt(C)) as its first channel and colour in the others."""
  basis = np.eye(num_channels)
  basis[:, 0] = 1.0
  q, _ = np.linalg.qr(basis)
  return q * np.sign(q[0, 0])


@_pytree
class Colorization(LinearOperator):
  """Grey from colour along the last axis: y = x @ q, q = ones(C) / sqrt(C); y [..., 1].

  q is the first column of ``decoupling_matrix``; its rows are orthonormal (A A^T = I),
  so y = sqrt(C) * the channel mean and A^+ = A^T.
  """
  _leaves = ('decoupling',)

  def __init__(self, x_shape):
    self.x_shape = tuple(x_shape)
    self.decoupling = jnp.asarray(decoupling_matrix(self.x_shape[-1]), jnp.float32)

  def forward(self, x):
    self._check(x)
    return x @ self.decoupling[:, :1]

  def adjoint(self, y):
    return y @ self.decoupling[:, :1].T

  def pinv(self, y):
    return self.adjoint(y)

  def decouple(self, x):
    return x @ self.decoupling

  def couple(self, z):
    return z @ self.decoupling.T


@_pytree
class SuperResolution(LinearOperator):
  """Average pooling of [H, W, C] images over factor x factor blocks (A A^T = I / f^2)."""
  _static = ('x_shape', 'factor')

  def __init__(self, factor: int, x_shape):
    h, w, _ = x_shape
    if factor < 1 or h % factor or w % factor:
      raise ValueError(f'SuperResolution factor {factor} must divide the image size {h}x{w}')
    self.x_shape, self.factor = tuple(x_shape), int(factor)

  def forward(self, x):
    self._check(x)
    b, h, w, c = x.shape
    f = self.factor
    return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))

  def adjoint(self, y):
    f = self.factor
    return jnp.repeat(jnp.repeat(y, f, axis=1), f, axis=2) / f**2

  def pinv(self, y):
    return self.adjoint(y) * self.factor**2


@_pytree
class FourierSubsampling(LinearOperator):
  """MRI-style measurement: the unitary 2-D DFT of each channel at the frequencies of a
  mask, as [B, m, C, 2] (real and imaginary parts).

  The mask is made symmetric under k -> -k (a real image's spectrum is conjugate-
  symmetric), which makes A a partial isometry: A^T A is the orthogonal projection onto
  the sampled frequencies and A^+ = A^T (zero-filled inverse DFT).
  """
  _leaves = ('rows', 'cols')

  def __init__(self, mask, num_channels: int = 1):
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
      raise ValueError(f'FourierSubsampling mask must be [H, W], got shape {mask.shape}')
    h, w = mask.shape
    flipped = mask[(-np.arange(h)) % h][:, (-np.arange(w)) % w]
    rows, cols = np.nonzero(mask | flipped)
    self.x_shape = (h, w, num_channels)
    self.rows, self.cols = jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)

  def forward(self, x):
    self._check(x)
    k = jnp.fft.fft2(x, axes=(1, 2), norm='ortho')[:, self.rows, self.cols, :]
    return jnp.stack([k.real, k.imag], axis=-1)

  def adjoint(self, y):
    b = y.shape[0]
    k = jnp.zeros((b,) + self.x_shape, jnp.complex64)
    k = k.at[:, self.rows, self.cols, :].set(y[..., 0] + 1j * y[..., 1])
    return jnp.fft.ifft2(k, axes=(1, 2), norm='ortho').real.astype(y.dtype)

  def pinv(self, y):
    return self.adjoint(y)


def fourier_mask(key, size: int, acceleration: int = 4, center_lines: int = 4) -> np.ndarray:
  """Cartesian undersampling, symmetric under k -> -k: the center_lines lowest frequencies
  (DC, then +-1, +-2, ...) and random +-k pairs of other lines (columns), about
  size / acceleration distinct lines in all (counted after the symmetry)."""
  k = np.fft.fftfreq(size) * size                       # signed frequency of each column
  order = np.argsort(np.abs(k), kind='stable')
  lines = np.zeros(size, bool)
  lines[order[:center_lines]] = True
  lines |= lines[(-np.arange(size)) % size]             # the mirrors of the center lines
  target = max(size // acceleration, int(lines.sum()))
  pairs = [f for f in range(1, size // 2 + 1) if not lines[f]]
  picks = np.asarray(jax.random.permutation(key, np.asarray(pairs))) if pairs else []
  for f in picks:
    if lines.sum() >= target:
      break
    lines[f] = lines[(-f) % size] = True
  return np.broadcast_to(lines[None, :], (size, size)).copy()


@_pytree
class RadonTransform(LinearOperator):
  """Sparse-view CT: line integrals of [H, W, C] images (H = W) along parallel rays at a
  few angles in [0, pi); y [B, angles, W, C]. The image is sampled along each ray by
  bilinear interpolation at unit spacing (zero outside). Rays and detector span W pixels
  through the centre, so the field of view is the inscribed disc: at oblique angles the
  corners are seen only partly. A^+ by conjugate gradients."""
  _leaves = ('index', 'weight')

  def __init__(self, num_angles: int, x_shape):
    h, w, _ = x_shape
    if h != w:
      raise ValueError(f'RadonTransform needs square images, got x_shape {tuple(x_shape)}')
    self.x_shape = tuple(x_shape)
    theta = np.arange(num_angles) * np.pi / num_angles
    c = (h - 1) / 2
    u = np.arange(w) - c                        # detector position
    v = np.arange(h) - c                        # position along the ray
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    rows = c + v[None, None, :] * cos - u[None, :, None] * sin     # [A, U, V]
    cols = c + v[None, None, :] * sin + u[None, :, None] * cos
    r0, c0 = np.floor(rows), np.floor(cols)
    index, weight = [], []
    for dr in (0, 1):
      for dc in (0, 1):
        rr, cc = r0 + dr, c0 + dc
        wgt = (1 - np.abs(rows - rr)) * (1 - np.abs(cols - cc))
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        index.append(np.where(inside, rr * w + cc, 0).astype(np.int32))
        weight.append(np.where(inside, wgt, 0.0))
    self.index = jnp.asarray(np.stack(index, -1))                  # [A, U, V, 4]
    self.weight = jnp.asarray(np.stack(weight, -1), jnp.float32)
    self.cg_iters = 4 * h

  def tree_flatten(self):
    leaves, aux = super().tree_flatten()
    return leaves, aux + (self.cg_iters,)

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    obj = super().tree_unflatten(aux[:-1], leaves)
    object.__setattr__(obj, 'cg_iters', aux[-1])
    return obj

  def forward(self, x):
    self._check(x)
    b, h, w, c = x.shape
    samples = x.reshape(b, h * w, c)[:, self.index]                # [B, A, U, V, 4, C]
    return jnp.einsum('bauvkc,auvk->bauc', samples, self.weight)


# -----------------------------------------------------------------------------
# Posterior score terms from Tweedie's formulas.
# -----------------------------------------------------------------------------


def _moment_matching(sde, operator, noise_std, cg_iters, data_var, max_time, score_fn, y, x, t):
  """score + grad_x log N(y; A E[x_0|x_t], A Cov[x_0|x_t] A^T + noise_std^2 I), per example.

  The covariance is taken as constant in x_t (exact for Gaussian data, whose posterior
  covariance does not depend on x_t). With ``data_var`` None it is Tweedie's (s^2 / a) J
  through the score's Jacobian J (one linearization, one JVP per CG iteration); with a
  number v it is the isotropic v s^2 / (a^2 v + s^2) I of Gaussian data of variance v (as
  PiGDM), which needs no JVP and keeps the system positive definite.
  """
  a, std = sde.marginal_coeffs(t)

  def one(x1, t1, y1, a1, s1):
    score, score_jvp = jax.linearize(lambda u: score_fn(u[None], t1[None])[0], x1)
    score_vjp = jax.linear_transpose(score_jvp, x1)
    x0 = (x1 + s1**2 * score) / a1                   # Tweedie's mean; J = dx0/dx_t:
    jvp = lambda u: (u + s1**2 * score_jvp(u)) / a1
    vjp = lambda v: (v + s1**2 * score_vjp(v)[0]) / a1
    residual = y1 - operator.forward(x0[None])[0]

    def cov_y(v):      # (A Cov A^T + noise^2 I) v
      u = operator.adjoint(v[None])[0]
      if data_var is None:
        cu = (s1**2 / a1) * jvp(u)
      else:
        cu = data_var * s1**2 / (a1**2 * data_var + s1**2) * u
      return operator.forward(cu[None])[0] + noise_std**2 * v

    w = jax.scipy.sparse.linalg.cg(cov_y, residual, maxiter=cg_iters, tol=1e-6)[0]
    # where, not a product: above max_time a diverged CG solve must not leak inf or NaN.
    return score + jnp.where(t1 <= max_time, vjp(operator.adjoint(w[None])[0]), 0.0)

  return jax.vmap(one)(x, t, y, a, std)


def moment_matching_score(sde, operator, score_fn, y, noise_std=0.0, cg_iters=50,
                          covariance='jacobian', data_var=1.0, max_time=None):
  """The posterior score with p_t(y | x_t) ~ N(A E[x_0|x_t], A Cov[x_0|x_t] A^T + noise^2 I).

  covariance 'jacobian': Tweedie's second-order formula through the score's Jacobian, exact
  when the data distribution is Gaussian; each evaluation costs a score evaluation, its
  linearization and up to ``cg_iters`` Jacobian-vector products. A learned score's Jacobian
  can make the system indefinite (CG then diverges; see the README's digits figures).
  covariance 'isotropic': Cov = data_var s^2 / (a^2 data_var + s^2) I (PiGDM's choice),
  positive definite and without JVPs. ``max_time``: no guidance above this time. At high
  noise d x0_hat / d x_t is small for the true score but a learned score's error in it is
  amplified by 1 / a(t); the true guidance is nearly zero there anyway. A score function: it
  plugs into the PC and ODE samplers alike.
  """
  if covariance not in ('jacobian', 'isotropic'):
    raise ValueError(f"covariance must be 'jacobian' or 'isotropic', got {covariance!r}")
  return jax.tree_util.Partial(_moment_matching, sde, operator, noise_std, cg_iters,
                               None if covariance == 'jacobian' else float(data_var),
                               sde.T if max_time is None else float(max_time),
                               sde_lib.as_pytree(score_fn), y)


def _dps(sde, operator, step_size, score_fn, y, x, t):
  def residual_norm(x):
    score = score_fn(x, t)
    x0 = sde.tweedie_mean(x, t, score)
    return jnp.sum(sde_lib.per_example_norm(y - operator.forward(x0))), score

  grad, score = jax.grad(residual_norm, has_aux=True)(x)
  _, g_step = sde.discretize(x, t)    # the reverse-diffusion step adds G^2 * score
  # zeta / ||r|| * grad ||r||^2 = 2 zeta grad ||r||, divided by G^2 so that the step
  # subtracts exactly that (DPS's update on the ancestral / reverse-diffusion chain).
  return score - batch_broadcast(2 * step_size / g_step**2, x) * grad


def dps_score(sde, operator, score_fn, y, step_size=1.0):
  """Diffusion posterior sampling (Chung et al. 2023) as a score for the PC sampler.

  Each reverse-diffusion step subtracts zeta_i grad_{x_t} ||y - A x0_hat(x_t)||^2 with
  zeta_i = step_size / ||y - A x0_hat|| (the paper's step size for noisy measurements).
  One evaluation costs a score evaluation and its gradient.
  """
  return jax.tree_util.Partial(_dps, sde, operator, step_size, sde_lib.as_pytree(score_fn), y)


# -----------------------------------------------------------------------------
# Inverse-problem samplers.
# -----------------------------------------------------------------------------


INVERSE_METHODS = ('imputation', 'projection', 'dps', 'moment_matching')
_OPTIONS = {'imputation': {}, 'projection': {'weight': 1.0}, 'dps': {'step_size': 1.0},
            'moment_matching': {'cg_iters': 50, 'covariance': 'jacobian', 'data_var': 1.0,
                                'max_time': None}}


def _perturbed_measurement(sde, operator, key, y, t, shape):
  """A sample of A x_t given a noiseless y = A x_0: a(t) y + s(t) A z."""
  a, std = sde.marginal_coeffs(t)
  az = operator.forward(jax.random.normal(key, shape))
  return batch_broadcast(a, y) * y + batch_broadcast(std, y) * az, batch_broadcast(a, y) * y


def get_inverse_sampler(sde, operator, shape, method, *, noise_std=0.0,
                        predictor='reverse_diffusion', corrector=None, snr=0.16, n_steps=1,
                        probability_flow=False, denoise=True, eps=1e-3, **options):
  """A posterior sampler for y = A x_0 + noise_std z on the predictor-corrector loop.

  Methods (``INVERSE_METHODS``) and their options:
    'imputation': the SDE paper's imputation (appendix I) for any operator with a closed-
      form pseudo-inverse (masks, colorization, ...): after the corrector and after the
      predictor, the measured part of x is replaced by a fresh sample of A x_t given y,
      a(t) y + s(t) A z, and that of x_mean by its mean a(t) y; the start is the prior with
      the measured part perturbed to time T. Noiseless measurements only.
    'projection': Song et al. 2022: before each step x <- x + weight A^+ (y_t - A x) with
      y_t = a y + s A z (weight: their lambda in [0, 1]).
    'dps': diffusion posterior sampling, option step_size (see ``dps_score``).
    'moment_matching': the Tweedie moment-matched likelihood (``moment_matching_score``),
      exact for Gaussian data; options cg_iters, covariance ('jacobian' | 'isotropic'),
      data_var (isotropic), max_time (no guidance above it).
  With noiseless measurements, imputation and projection with weight 1 end with x <- x +
  A^+ (y - A x), so that the measured part is exact. ``corrector`` defaults to 'langevin'
  for imputation and projection, 'none' for the guided methods: DPS's step is calibrated to
  the reverse-diffusion predictor (a corrector would take it with a step of its own).

  Returns:
    ``sampler(key, score_fn, y) -> (samples [shape], nfe)``, nfe counting evaluations of
    the (guided) score: a DPS evaluation is one forward and one backward pass of the
    network, a moment-matching one adds up to cg_iters Jacobian-vector products.
  """
  if method not in INVERSE_METHODS:
    raise ValueError(f'Unknown inverse method {method!r}; valid methods: {list(INVERSE_METHODS)}')
  unknown = set(options) - set(_OPTIONS[method])
  if unknown:
    raise ValueError(f'Unknown option(s) {sorted(unknown)} for method {method!r}; valid: '
                     f'{sorted(_OPTIONS[method])}')
  opts = dict(_OPTIONS[method], **options)
  if noise_std < 0:
    raise ValueError(f'noise_std must be >= 0, got {noise_std}')
  if method == 'imputation' and noise_std > 0:
    raise ValueError('imputation assumes noiseless measurements (noise_std=0); use dps, '
                     'moment_matching or projection for noisy ones')
  if tuple(shape[1:]) != tuple(operator.x_shape):
    raise ValueError(f'sampler shape {tuple(shape)} does not match the operator\'s x_shape '
                     f'{tuple(operator.x_shape)}')
  if corrector is None:
    corrector = 'langevin' if method in ('imputation', 'projection') else 'none'
  predictor = sampling.get_predictor(predictor, probability_flow)
  corrector = sampling.get_corrector(corrector, snr, n_steps)
  timesteps, dt = sampling.reverse_time_grid(sde, eps)
  nfe = sde.N * (predictor.nfe + corrector.nfe)
  weight = opts.get('weight', 1.0)

  @jax.jit
  def _sample(key, score_fn, y, operator):
    def impute(key, x, x_mean, t, y):
      y_t, y_mean = _perturbed_measurement(sde, operator, key, y, t, shape)
      return operator.project(x, y_t), operator.project(x_mean, y_mean)

    if method == 'dps':
      score_fn = dps_score(sde, operator, score_fn, y, opts['step_size'])
    elif method == 'moment_matching':
      score_fn = moment_matching_score(sde, operator, score_fn, y, noise_std, opts['cg_iters'],
                                       opts['covariance'], opts['data_var'], opts['max_time'])
    k_prior, k_init, k_loop = jax.random.split(key, 3)
    x = sde.prior_sampling(k_prior, shape)
    t_start = jnp.full(shape[:1], sde.T)
    if method == 'imputation':
      x, _ = impute(k_init, x, x, t_start, y)

    def body(carry, inputs):
      x, x_mean, state = carry
      t, key = inputs
      k_c, k_ci, k_p, k_pi = jax.random.split(key, 4)
      t_vec = jnp.full(shape[:1], t)
      if method == 'projection':
        x = operator.project(x, _perturbed_measurement(sde, operator, k_ci, y, t_vec, shape)[0],
                             weight)
      x, x_mean = corrector.update(sde, score_fn, k_c, x, t_vec)
      if method == 'imputation':   # the predictor reads x alone: x_mean is imputed after it
        x = operator.project(x, _perturbed_measurement(sde, operator, k_ci, y, t_vec, shape)[0])
      x, x_mean, state = predictor.update(sde, score_fn, k_p, x, t_vec, dt, state)
      if method == 'imputation':
        x, x_mean = impute(k_pi, x, x_mean, jnp.maximum(t_vec + dt, 0.0), y)
      return (x, x_mean, state), None

    init = (x, x, predictor.init(x))
    (x, x_mean, _), _ = jax.lax.scan(body, init, (timesteps, jax.random.split(k_loop, sde.N)))
    out = x_mean if denoise else x
    if noise_std == 0 and (method == 'imputation' or (method == 'projection' and weight == 1)):
      out = operator.project(out, y)
    return out

  def sampler(key, score_fn, y):
    want = (shape[0],) + tuple(operator.forward(jnp.zeros((1,) + tuple(shape[1:]))).shape[1:])
    if tuple(y.shape) != want:
      raise ValueError(f'y has shape {tuple(y.shape)}; the operator measures batches of '
                       f'{tuple(shape)} as {want}')
    return _sample(key, sde_lib.as_pytree(score_fn), y, operator), nfe

  return sampler
