"""Score networks: shapes, time conditioning, dropout, per-example independence, gradients.

Compiling is most of the cost here, so each configuration is initialized once
(parameters do not depend on the batch size, nor on the dropout rate), inputs
and perturbations are drawn with NumPy, and init uses the 'unsafe_rbg' key
(cheaper to compile than threefry; these tests need no particular stream).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.mlp import ScoreMLP
from models.unet import UNet

# name: (model, x shape). Every network/configuration pair the smoke test covers.
CASES = {
    'unet_8x8x1': (UNet(), (4, 8, 8, 1)),
    'unet_16x16x3_attn8': (UNet(attn_resolutions=(8,)), (2, 16, 16, 3)),
    'unet_16x16x3_positional_3levels': (
        UNet(ch=16, ch_mult=(1, 2, 2), embedding='positional', attn_resolutions=(4,)), (2, 16, 16, 3)),
    'mlp_2d': (ScoreMLP(), (5, 2)),
}


@functools.cache
def _params(name):
  model, shape = CASES[name]
  x = jnp.zeros((1,) + shape[1:])
  return jax.jit(model.init)(jax.random.key(0, impl='unsafe_rbg'), x, jnp.zeros((1,)))['params']


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(shape), jnp.float32),
          jnp.asarray(rng.uniform(0.05, 0.95, shape[:1]), jnp.float32))


def _perturb_zeros(params, seed=1):
  """Replaces every all-zero parameter (zero-initialized output layers, biases) by noise.

  Zero-initialized output layers make the untrained output exactly 0 and block the
  gradient to the layers before them; with small random values there, the tests can
  see whether t, dropout and every weight actually reach the output.
  """
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32) if not np.any(p) else p,
      params)


@pytest.mark.parametrize('name', sorted(CASES))
def test_shape_finite_and_depends_on_t(name):
  model, shape = CASES[name]
  params = _params(name)
  x, t = _inputs(shape)
  apply = jax.jit(model.apply)
  out = apply({'params': params}, x, t)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  if isinstance(model, UNet):
    # The final conv starts at zero, so the untrained output is exactly 0.
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    params = _perturb_zeros(params)
  # The same image at two times (same batch size, so no recompilation).
  x_same = jnp.broadcast_to(x[:1], x.shape)
  t_pair = jnp.where(jnp.arange(shape[0]) == 0, 0.1, 0.9)
  out = apply({'params': params}, x_same, t_pair)
  assert np.all(np.isfinite(np.asarray(out))) and float(jnp.std(out)) > 1e-3
  diff = float(jnp.max(jnp.abs(out[0] - out[1])))
  assert diff > 1e-3 * float(jnp.max(jnp.abs(out))), diff


def test_attention_blocks_only_at_requested_resolutions():
  attn = [k for k in _params('unet_16x16x3_attn8') if k.startswith('AttnBlock')]
  # ch_mult=(1, 2) and one block per level: at resolution 8 sit the down block,
  # the middle block and the up block.
  assert len(attn) == 3, attn
  assert not [k for k in _params('unet_8x8x1') if k.startswith('AttnBlock')]


def test_scalar_t_broadcasts():
  params = _perturb_zeros(_params('unet_8x8x1'))
  x, _ = _inputs((3, 8, 8, 1))
  apply = jax.jit(UNet().apply)
  out_scalar = apply({'params': params}, x, jnp.float32(0.3))
  out_vector = apply({'params': params}, x, jnp.full((3,), 0.3))
  np.testing.assert_allclose(np.asarray(out_scalar), np.asarray(out_vector), rtol=1e-6, atol=1e-6)


def test_examples_are_independent():
  """No op mixes the batch (so it may be sharded): example 0 alone gives the same output."""
  model, shape = CASES['unet_16x16x3_attn8']
  params = _perturb_zeros(_params('unet_16x16x3_attn8'))
  x, t = _inputs(shape)
  apply = jax.jit(lambda x, t: model.apply({'params': params}, x, t))
  np.testing.assert_allclose(np.asarray(apply(x, t)[:1]), np.asarray(apply(x[:1], t[:1])), atol=1e-5)


def test_dropout_only_in_training():
  model = UNet(dropout=0.5)
  params = _perturb_zeros(_params('unet_8x8x1'))
  x, t = _inputs((2, 8, 8, 1))
  apply = jax.jit(lambda key, train: model.apply(
      {'params': params}, x, t, train=train, rngs={'dropout': key}), static_argnums=1)
  key_1, key_2 = jax.random.key(1), jax.random.key(2)
  eval_1, eval_2 = apply(key_1, False), apply(key_2, False)
  np.testing.assert_array_equal(np.asarray(eval_1), np.asarray(eval_2))
  train_1, train_2 = apply(key_1, True), apply(key_2, True)
  assert float(jnp.max(jnp.abs(train_1 - train_2))) > 1e-3
  assert float(jnp.max(jnp.abs(train_1 - eval_1))) > 1e-3
  np.testing.assert_array_equal(np.asarray(train_1), np.asarray(apply(key_1, True)))


@pytest.mark.parametrize('shape, ch_mult', [((2, 7, 8, 1), (1, 2)), ((2, 8, 6, 1), (1, 2, 2))])
def test_indivisible_size_raises(shape, ch_mult):
  with pytest.raises(ValueError, match=r'ch_mult=.*got shape \(2, (7, 8|8, 6), 1\)'):
    jax.eval_shape(UNet(ch_mult=ch_mult).init, jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]))


def test_unknown_embedding_raises():
  with pytest.raises(ValueError, match='fourier'):
    jax.eval_shape(UNet(embedding='learned').init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                   jnp.zeros((1,)))


def test_gradients_finite_and_fourier_frequencies_fixed():
  model = UNet(attn_resolutions=(8,), dropout=0.1)
  params = _perturb_zeros(_params('unet_16x16x3_attn8'))
  x, t = _inputs((2, 16, 16, 3))

  def loss(p):
    out = model.apply({'params': p}, x, t, train=True, rngs={'dropout': jax.random.key(3)})
    return jnp.mean(jnp.square(out + x))

  grads = jax.jit(jax.grad(loss))(params)
  named = {jax.tree_util.keystr(path): np.asarray(g)
           for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert all(np.all(np.isfinite(g)) for g in named.values())
  # The random Fourier frequencies are fixed (stop_gradient); every other weight learns.
  fourier = [name for name in named if 'FourierTimeEmbedding' in name]
  assert fourier and all(not np.any(named[name]) for name in fourier)
  dead = [name for name, g in named.items() if name not in fourier and not np.any(g)]
  assert not dead, dead


def test_parameter_count():
  count = sum(p.size for p in jax.tree_util.tree_leaves(_params('unet_8x8x1')))
  print(f'UNet() on 8x8x1: {count} parameters')
  assert 100_000 <= count <= 500_000, count
