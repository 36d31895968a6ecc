"""Score networks: shapes, time conditioning, dropout, per-example independence, gradients.

The image networks here are the digits preset of the NCSN++ family
(models/ncsnpp.DigitsUNet) and variants of it, conditioned on t in [0, 1] as our
convention feeds them; the toy network is the MLP. Compiling is most of the cost
here, so each configuration is initialized once (parameters do not depend on the
batch size, nor on the dropout rate), inputs and perturbations are drawn with NumPy,
and init uses the 'unsafe_rbg' key (cheaper to compile than threefry; these tests
need no particular stream).
"""
import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers
from models import ncsnpp
from models.mlp import ScoreMLP

# name: (model, x shape). Every network/configuration pair the smoke test covers.
CASES = {
    'digits_8x8x1': (ncsnpp.DigitsUNet(), (4, 8, 8, 1)),
    'digits_16x16x3_attn8': (ncsnpp.DigitsUNet(attn_resolutions=(8,)), (2, 16, 16, 3)),
    'digits_16x16x3_positional_3levels': (
        ncsnpp.DigitsUNet(nf=16, ch_mult=(1, 2, 2), embedding_type='positional',
                          attn_resolutions=(4,)), (2, 16, 16, 3)),
    'mlp_2d': (ScoreMLP(), (5, 2)),
}
# DigitsUNet() on 8x8x1 images: the size of the U-Net it replaced (394,305 parameters).
DIGITS_PARAMETERS = 369_457


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


def _random_params(model, shape, seed=2):
  """Random parameters of the model's shapes, without compiling its init (eval_shape)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + shape[1:]),
                          jnp.zeros((1,)))['params']
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape) / np.sqrt(max(1, np.prod(p.shape[:-1]))),
                            jnp.float32), shapes)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CASES))
def test_shape_finite_and_depends_on_t(name):
  model, shape = CASES[name]
  params = _params(name)
  x, t = _inputs(shape)
  apply = jax.jit(model.apply)
  out = apply({'params': params}, x, t)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  if isinstance(model, ncsnpp.NCSNpp):
    # The output conv starts at zero (init_scale 0), so the untrained output is exactly 0.
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    params = _perturb_zeros(params)
  # The same image at two times (same batch size and types, so no recompilation: a weakly
  # typed t, as jnp.where of Python floats gives, would compile the network again).
  x_same = jnp.broadcast_to(x[:1], x.shape)
  t_pair = jnp.where(jnp.arange(shape[0]) == 0, 0.1, 0.9).astype(jnp.float32)
  out = apply({'params': params}, x_same, t_pair)
  assert np.all(np.isfinite(np.asarray(out))) and float(jnp.std(out)) > 1e-3
  diff = float(jnp.max(jnp.abs(out[0] - out[1])))
  assert diff > 1e-3 * float(jnp.max(jnp.abs(out))), diff


def _attention_blocks(params):
  """Top-level modules with the attention block's output projection NIN_3."""
  return [name for name, module in params.items() if 'NIN_3' in module]


def test_attention_blocks_only_at_requested_resolutions():
  # ch_mult=(1, 2) and one block per level: at resolution 8 sit the down block and the
  # up level (one attention each), besides the middle's, which the family always has.
  assert len(_attention_blocks(_params('digits_16x16x3_attn8'))) == 3
  assert len(_attention_blocks(_params('digits_8x8x1'))) == 1


def test_scalar_t_broadcasts():
  # The vector call has the shapes and types of test_shape_finite_and_depends_on_t's
  # (batch 4, float32 t): the same program, which the run's compilation cache then holds.
  model, shape = CASES['digits_8x8x1']
  params = _perturb_zeros(_params('digits_8x8x1'))
  x, _ = _inputs(shape)
  apply = jax.jit(model.apply)
  out_scalar = apply({'params': params}, x, jnp.float32(0.3))
  out_vector = apply({'params': params}, x, jnp.full((shape[0],), 0.3, jnp.float32))
  np.testing.assert_allclose(np.asarray(out_scalar), np.asarray(out_vector), rtol=1e-6, atol=1e-6)


def test_examples_are_independent():
  """No op mixes the batch (so it may be sharded): example 0 alone gives the same output."""
  model, shape = CASES['digits_16x16x3_attn8']
  variables = {'params': _perturb_zeros(_params('digits_16x16x3_attn8'))}
  x, t = _inputs(shape)
  # Parameters as arguments, not constants: the full batch is then the program of
  # test_shape_finite_and_depends_on_t, which the run's compilation cache holds.
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(np.asarray(apply(variables, x, t)[:1]),
                             np.asarray(apply(variables, x[:1], t[:1])), atol=1e-5)


def test_dropout_only_in_training():
  model = ncsnpp.DigitsUNet(dropout=0.5)
  params = _perturb_zeros(_params('digits_8x8x1'))
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
    jax.eval_shape(ncsnpp.DigitsUNet(ch_mult=ch_mult).init, jax.random.key(0), jnp.zeros(shape),
                   jnp.zeros(shape[:1]))


def test_unknown_embedding_raises():
  with pytest.raises(ValueError, match='fourier'):
    jax.eval_shape(ncsnpp.DigitsUNet(embedding_type='learned').init, jax.random.key(0),
                   jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))


def test_gradients_finite_and_fourier_frequencies_fixed():
  model = ncsnpp.DigitsUNet(attn_resolutions=(8,), dropout=0.1)
  params = _perturb_zeros(_params('digits_16x16x3_attn8'))
  x, t = _inputs((2, 16, 16, 3))

  def loss(p):
    out = model.apply({'params': p}, x, t, train=True, rngs={'dropout': jax.random.key(3)})
    return jnp.mean(jnp.square(out + x))

  grads = jax.jit(jax.grad(loss))(params)
  named = {jax.tree_util.keystr(path): np.asarray(g)
           for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert all(np.all(np.isfinite(g)) for g in named.values())
  # The random Fourier frequencies W are fixed (stop_gradient); every other weight learns.
  fourier = [name for name in named if name.endswith("['W']")]
  assert fourier == ["['all_modules_0']['W']"]
  assert not np.any(named[fourier[0]])
  dead = [name for name, g in named.items() if name not in fourier and not np.any(g)]
  assert not dead, dead


def test_parameter_count():
  count = _count(_params('digits_8x8x1'))
  print(f'DigitsUNet() on 8x8x1: {count} parameters')
  assert count == DIGITS_PARAMETERS


# ---------------------------------------------------------------------------
# One network family for the images and one definition of each embedding.


@pytest.mark.parametrize('sde', ['ve', 'vp', 'subvp'])
def test_digits_configs_build_the_family_preset(sde):
  """configs/{ve,vp,subvp}/digits.py build DigitsUNet, under our convention, whatever
  data.centered says (our convention's inputs are scaled, the network takes them as they are)."""
  import builder
  config = importlib.import_module(f'configs.{sde}.digits').get_config()
  assert config.model.convention == 'ours'
  model = builder.make_model(config)
  assert isinstance(model, ncsnpp.NCSNpp)
  for field, value in ncsnpp.DigitsUNet.keywords.items():
    assert getattr(model, field) == value, field
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
  assert _count(shapes['params']) == DIGITS_PARAMETERS


def _features(model, params, x, t):
  """Output of the model's GaussianFourierProjection and that projection's W."""
  _, state = model.apply({'params': params}, x, t,
                         capture_intermediates=lambda m, _: isinstance(m, layers.GaussianFourierProjection))
  [(name, calls)] = state['intermediates'].items()
  return np.asarray(calls['__call__'][0]), params[name]['W']


def _fourier(w, u):
  """[sin(2 pi u W), cos(2 pi u W)], in float64."""
  proj = 2 * np.pi * np.asarray(u, np.float64)[:, None] * np.asarray(w, np.float64)[None, :]
  return np.concatenate([np.sin(proj), np.cos(proj)], axis=-1)


def test_mlp_and_family_use_the_one_fourier_projection():
  """The MLP's time features and the digits preset's are layers.GaussianFourierProjection of t
  (scale 16, frequencies drawn once and fixed); NCSN++'s 'fourier' embeds log(labels) with it."""
  t = jnp.asarray([0.05, 0.5, 1.0], jnp.float32)
  mlp_features, w = _features(ScoreMLP(), _params('mlp_2d'), jnp.zeros((3, 2)), t)
  assert w.shape == (32,)
  shared = layers.GaussianFourierProjection(embedding_size=32, scale=16.0).apply(
      {'params': {'W': w}}, t)
  np.testing.assert_array_equal(mlp_features, np.asarray(shared))
  np.testing.assert_allclose(mlp_features, _fourier(w, t), atol=2e-4)
  # Fixed frequencies ~ N(0, 16^2): 32 draws, std within 30% of 16.
  assert 0.7 * 16 < float(np.std(w)) < 1.3 * 16

  # The family, narrow (run eagerly: only the embedding is under test).
  x = jnp.zeros((3, 8, 8, 1))
  for embedding, label in (('fourier_time', t), ('fourier', np.log(t))):
    model = ncsnpp.DigitsUNet(nf=8, ch_mult=(1,), embedding_type=embedding)
    features, w = _features(model, _random_params(model, x.shape), x, t)
    assert w.shape == (8,)
    np.testing.assert_allclose(features, _fourier(w, label), atol=2e-4)


def test_each_embedding_is_defined_once():
  """Sinusoids (the sinusoidal and the Fourier embeddings) are written in models/layers.py only."""
  models_dir = os.path.dirname(layers.__file__)
  writers = [name for name in sorted(os.listdir(models_dir)) if name.endswith('.py')
             and ('jnp.sin(' in open(os.path.join(models_dir, name)).read())]
  assert writers == ['layers.py'], writers


@pytest.mark.parametrize('convention', ['ours', 'reference'])
def test_the_config_convention_not_the_model_name_picks_the_score(convention):
  """The same NCSN++-family network (model.name 'ncsnpp') under each model.convention, VP:
  ours feeds c_in(t) x and t, and the output is the noise (score -out / std); the reference's
  feeds x and 999 t (VP continuous), with the same output map."""
  import builder
  from configs.vp import digits
  config = digits.get_config()
  config.model.update(nf=8, ch_mult=(1,), convention=convention)
  data_std = 0.5
  comp = builder.build_components(config, (8, 8, 1), data_std)
  x, t = _inputs((2, 8, 8, 1))
  variables = {'params': _random_params(comp.model, x.shape)}   # eager below: no compiles
  score = np.asarray(comp.score_fn(variables)(x, t))
  a, std = (np.asarray(v)[:, None, None, None] for v in comp.sde.marginal_coeffs(t))
  if convention == 'ours':
    c_in = 1.0 / np.sqrt(a**2 * data_std**2 + std**2)
    out = comp.model.apply(variables, x * c_in, t)
  else:
    out = comp.model.apply(variables, x, 999.0 * t)
  assert float(np.std(out)) > 1e-3
  np.testing.assert_allclose(score, -np.asarray(out) / std, rtol=1e-4, atol=1e-5)
