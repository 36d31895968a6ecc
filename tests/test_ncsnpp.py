"""NCSN++ family (models/ncsnpp.py) and its layers (models/layers.py).

Parameter counts of the paper-size presets are checked against the reference
PyTorch models with jax.eval_shape (no real init). The behaviour tests use tiny
models (nf 16, ch_mult (1, 2), 8x8 inputs) that together cover every option
value. Compiling dominates, so they run with random parameters of the shapes
jax.eval_shape gives (no init compile); one of them is also really initialized,
with init_scale=0, to check the exactly-zero untrained output.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from models import layers
from models import ncsnpp

# Reference PyTorch parameter counts (REFERENCE.md, Sec. 5): preset, image size, count.
PARAM_COUNTS = {
    'NCSNppCifar10': (32, 62_758_915),
    'NCSNppPositionalCifar10': (32, 62_693_251),
    'NCSNppVPCifar10': (32, 62_693_251),
    'NCSNppDeepCifar10': (32, 107_587_075),
    'DDPMppCifar10': (32, 61_804_419),
    'DDPMppDeepCifar10': (32, 106_632_579),
    'NCSNppDeepVPCifar10': (32, 107_521_411),
    'DDPM': (32, 35_218_947),
    'NCSNpp256': (256, 65_574_549),
    'DDPM256': (256, 111_569_923),
}


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('preset', sorted(PARAM_COUNTS))
def test_parameter_count_matches_reference(preset):
  size, expected = PARAM_COUNTS[preset]
  model = getattr(ncsnpp, preset)()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)),
                          jnp.ones((1,)))
  assert _count(shapes['params']) == expected


def test_module_names_follow_reference_order():
  """Top-level modules are all_modules_0..N-1 with no gaps (the reference list's indices)."""
  shapes = jax.eval_shape(ncsnpp.DDPM().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.ones((1,)))
  names = sorted(shapes['params'], key=lambda n: int(n.rsplit('_', 1)[1]))
  assert names == [f'all_modules_{i}' for i in range(len(names))]
  # DDPM: 2 embedding Dense, conv_in, 8 down blocks + 2 attn (at 16) + 3 downsamplers,
  # 3 middle, 12 up blocks + 1 attn + 3 upsamplers, GroupNorm, conv_out.
  assert len(names) == 2 + 1 + 8 + 2 + 3 + 3 + 12 + 1 + 3 + 2
  assert set(shapes['params']['all_modules_0']) == {'kernel', 'bias'}  # Dense 128 -> 512
  assert shapes['params']['all_modules_0']['kernel'].shape == (128, 512)


# ---------------------------------------------------------------------------
# FIR resampling.


def _upfirdn2d_numpy(x, k, up, down, pad):
  """Direct reference: zero insertion, padding, scipy 2-D convolution, decimation."""
  b, h, w, c = x.shape
  z = np.zeros((b, h * up, w * up, c), x.dtype)
  z[:, ::up, ::up] = x
  z = np.pad(z, ((0, 0), pad, pad, (0, 0)))
  out = np.stack([np.stack([signal.convolve2d(z[i, :, :, j], k, mode='valid')
                            for j in range(c)], axis=-1) for i in range(b)])
  return out[:, ::down, ::down]


@pytest.mark.parametrize('up,down,pad', [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)),
                                         (2, 2, (3, 0))])
def test_upfirdn2d_matches_direct_convolution(up, down, pad):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
  k = rng.standard_normal((4, 4)).astype(np.float32)  # not symmetric: checks the flip
  got = layers.upfirdn2d(jnp.asarray(x), k, up=up, down=down, pad=pad)
  np.testing.assert_allclose(np.asarray(got), _upfirdn2d_numpy(x, k, up, down, pad),
                             atol=1e-5, rtol=1e-5)


def test_fir_constant_image():
  x = jnp.full((1, 8, 8, 2), 3.0)
  # Interior pixels (away from the zero padding) of a constant image keep the constant.
  np.testing.assert_allclose(layers.downsample_2d(x)[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
  np.testing.assert_allclose(layers.upsample_2d(x)[:, 2:-2, 2:-2], 3.0, rtol=1e-6)
  # The box kernel of size 2 has no support outside the 2x2 block: exact everywhere.
  np.testing.assert_allclose(layers.downsample_2d(x, (1, 1)), 3.0, rtol=1e-6)


def test_fir_box_kernel_is_nearest_and_average_pooling():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 4, 3)), jnp.float32)
  up = layers.upsample_2d(x, (1, 1))
  np.testing.assert_allclose(up, layers.naive_upsample_2d(x), atol=1e-6)
  np.testing.assert_allclose(up, jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), atol=1e-6)
  np.testing.assert_allclose(layers.downsample_2d(up, (1, 1)), x, atol=1e-6)
  pooled = np.asarray(x).reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(layers.downsample_2d(x, (1, 1)), pooled, atol=1e-6)


def test_fused_resampling_convs_match_unfused_in_the_interior():
  """upsample_conv_2d = conv(upsample_2d(x)), conv_downsample_2d = downsample_2d(conv(x))
  away from the borders (the fused ops pad once, so borders differ)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)
  conv = functools.partial(jax.lax.conv_general_dilated, rhs=w, window_strides=(1, 1),
                           padding=((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  fused_up = layers.upsample_conv_2d(x, w)
  assert fused_up.shape == (2, 16, 16, 5)
  np.testing.assert_allclose(fused_up[:, 2:-2, 2:-2], conv(layers.upsample_2d(x))[:, 2:-2, 2:-2],
                             atol=1e-4)
  fused_down = layers.conv_downsample_2d(x, w)
  assert fused_down.shape == (2, 4, 4, 5)
  np.testing.assert_allclose(fused_down[:, 1:-1, 1:-1],
                             layers.downsample_2d(conv(x))[:, 1:-1, 1:-1], atol=1e-4)


# ---------------------------------------------------------------------------
# Tiny models covering every option value.

_TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
             init_scale=0.0)
CASES = {
    # NCSN++: biggan, FIR, input residual, fourier, scale_by_sigma.
    'ncsnpp': dict(resblock_type='biggan', fir=True, progressive='none',
                   progressive_input='residual', embedding_type='fourier', scale_by_sigma=True),
    # biggan without FIR, output_skip + input_skip (cat), positional, centered, lrelu.
    'biggan_skip_cat': dict(resblock_type='biggan', fir=False, progressive='output_skip',
                            progressive_input='input_skip', progressive_combine='cat',
                            embedding_type='positional', scale_by_sigma=False, centered=True,
                            nonlinearity='lrelu'),
    # ddpm blocks with FIR convs, output residual, input_skip (sum), no skip_rescale.
    'ddpm_fir_residual': dict(resblock_type='ddpm', fir=True, progressive='residual',
                              progressive_input='input_skip', progressive_combine='sum',
                              skip_rescale=False, embedding_type='fourier', scale_by_sigma=False,
                              nonlinearity='elu'),
    # DDPM-like: no FIR, resampling without conv, unconditional, relu.
    'ddpm_plain': dict(resblock_type='ddpm', fir=False, resamp_with_conv=False,
                       progressive='none', progressive_input='none', skip_rescale=False,
                       embedding_type='positional', scale_by_sigma=False, conditional=False,
                       nonlinearity='relu'),
}
_SHAPE = (2, 8, 8, 3)


def _model(name):
  return ncsnpp.NCSNpp(**_TINY, **CASES[name])


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(0.0, 1.0, _SHAPE), jnp.float32)
  labels = jnp.asarray(rng.uniform(0.5, 20.0, _SHAPE[:1]), jnp.float32)  # positive: log taken
  return x, labels


@functools.cache
def _params(name):
  """Random parameters of the right shapes (eval_shape: no init compile).

  Kernels ~ N(0, 1/fan_in), biases small, GroupNorm scales 1, Fourier W ~ N(0, 16^2).
  """
  x, labels = _inputs()
  shapes = jax.eval_shape(_model(name).init, jax.random.key(0), x, labels)['params']
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    key = path[-1].key
    noise = rng.standard_normal(leaf.shape)
    if key == 'scale':
      value = np.ones(leaf.shape)
    elif key == 'bias':
      value = 0.1 * noise
    elif key == 'W':
      value = 16.0 * noise
    else:
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _apply(name):
  return jax.jit(_model(name).apply, static_argnames='train')


def test_zero_init_scale_gives_zero_output():
  """init_scale 0 zeroes the output conv (here, every output_skip pyramid conv, the
  nontrivial case) and conv biases start at 0: the untrained output is exactly 0, as
  in the reference (whose 1e-10 scale makes it ~0). Only one real init: it compiles slowly."""
  name = 'biggan_skip_cat'
  x, labels = _inputs()
  out, variables = jax.jit(_model(name).init_with_output)(
      jax.random.key(0, impl='unsafe_rbg'), x, labels)
  assert out.shape == _SHAPE
  assert not np.any(np.asarray(out))
  assert np.any(np.asarray(variables['params']['all_modules_1']['kernel']))


@pytest.mark.parametrize('name', sorted(CASES))
def test_tiny_model(name):
  x, labels = _inputs()
  params = _params(name)
  apply = _apply(name)
  out = np.asarray(apply({'params': params}, x, labels))
  assert out.shape == _SHAPE
  assert np.all(np.isfinite(out)) and np.std(out) > 0
  # Per-example independence (GroupNorm and attention act within an example).
  x2 = x.at[1].set(jnp.asarray(np.random.default_rng(3).uniform(size=_SHAPE[1:]), jnp.float32))
  out2 = np.asarray(apply({'params': params}, x2, labels))
  np.testing.assert_allclose(out2[0], out[0], atol=1e-6)
  assert np.max(np.abs(out2[1] - out[1])) > 1e-4
  # The noise level reaches the output, unless the model is unconditional.
  out3 = np.asarray(apply({'params': params}, x, labels * 1.5))
  assert (np.max(np.abs(out3 - out)) > 1e-5) == (CASES[name].get('conditional', True)
                                                  or CASES[name]['scale_by_sigma'])


def test_dropout_only_in_training():
  name = 'ddpm_plain'
  x, labels = _inputs()
  params = _params(name)
  apply = _apply(name)
  evaluated = apply({'params': params}, x, labels)
  train = functools.partial(apply, {'params': params}, x, labels, train=True)
  a = train(rngs={'dropout': jax.random.key(1)})
  b = train(rngs={'dropout': jax.random.key(1)})
  c = train(rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(a, b)
  assert np.max(np.abs(a - evaluated)) > 1e-5 and np.max(np.abs(a - c)) > 1e-5


def test_scale_by_sigma_divides_output_by_label():
  """Unconditional network with and without scale_by_sigma: outputs differ by 1/labels."""
  x, labels = _inputs()
  params = _params('ddpm_plain')
  unscaled = _apply('ddpm_plain')({'params': params}, x, labels)
  scaled = jax.jit(ncsnpp.NCSNpp(**_TINY, **dict(CASES['ddpm_plain'], scale_by_sigma=True)).apply)(
      {'params': params}, x, labels)
  np.testing.assert_allclose(scaled * labels[:, None, None, None], unscaled, rtol=1e-5, atol=1e-6)


def test_scale_by_sigma_with_discrete_levels_divides_by_sigmas_of_the_label():
  """Discrete VE: the label indexes the descending noise levels, and the output is divided by it."""
  x, _ = _inputs()
  labels = jnp.asarray([0, 3], jnp.int32)[: x.shape[0]]
  sigmas = (50.0, 5.0, 0.5, 0.05)
  params = _params('ddpm_plain')
  unscaled = _apply('ddpm_plain')({'params': params}, x, labels)
  model = ncsnpp.NCSNpp(**_TINY, **dict(CASES['ddpm_plain'], scale_by_sigma=True, sigmas=sigmas))
  scaled = jax.jit(model.apply)({'params': params}, x, labels)
  want = unscaled / jnp.asarray(sigmas)[labels][:, None, None, None]
  # Two programs, rounded apart by up to 4.4e-5 (relative, XLA:CPU's loop emitters); the
  # levels differ by factors of 10, so a wrong label is off by 900% or more.
  np.testing.assert_allclose(scaled, want, rtol=1e-4, atol=1e-7)


def test_fourier_weights_are_not_trained():
  proj = layers.GaussianFourierProjection(embedding_size=8, scale=16.0)
  t = jnp.asarray([0.3, 1.7])
  params = proj.init(jax.random.key(0), t)['params']
  assert params['W'].shape == (8,)
  np.testing.assert_allclose(np.std(params['W']), 16.0, rtol=0.8)
  out = proj.apply({'params': params}, t)
  assert out.shape == (2, 16)
  np.testing.assert_allclose(out[:, :8], np.sin(2 * np.pi * t[:, None] * params['W'][None, :]),
                             atol=1e-4)
  grads = jax.grad(lambda p: jnp.sum(proj.apply({'params': p}, t)))(params)
  assert not np.any(np.asarray(grads['W']))


def test_positional_embedding_values():
  t = jnp.asarray([0.0, 5.0])
  emb = layers.positional_embedding(t, 8)
  freqs = np.exp(-np.log(10000) * np.arange(4) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(5 * freqs), np.cos(5 * freqs)]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(emb[0], [0] * 4 + [1] * 4)


def test_invalid_option_names_raise():
  x, labels = _inputs()
  with pytest.raises(ValueError, match='progressive'):
    ncsnpp.NCSNpp(**_TINY, progressive='bogus').init(jax.random.key(0), x, labels)
  with pytest.raises(ValueError, match='nonlinearity'):
    layers.get_act('gelu2')


# ---------------------------------------------------------------------------
# bfloat16 mixed precision (dtype=jnp.bfloat16; config model.dtype='bfloat16').

# Relative L2 error of the bfloat16 output against float32 with the same parameters,
# measured on these tiny random-parameter models: 0.009 to 0.018 (bf16 has an 8-bit
# significand, unit roundoff 2^-9 ~ 0.002, accumulated over ~20 layers).
BF16_REL_L2_TOL = 4e-2


def _bf16_model(name):
  return ncsnpp.NCSNpp(**_TINY, **CASES[name], dtype=jnp.bfloat16)


def _result_dtypes(hlo, op):
  """Element types of the results of every `op` (e.g. 'convolution') in StableHLO text."""
  import re
  return re.findall(rf'stablehlo\.{op}\b.*-> tensor<[0-9x]*x?(\w+)>', hlo)


@pytest.mark.parametrize('name', sorted(CASES))
def test_bf16_parameters_are_float32_and_tree_unchanged(name):
  x, labels = _inputs()
  f32 = jax.eval_shape(_model(name).init, jax.random.key(0), x, labels)
  bf16 = jax.eval_shape(_bf16_model(name).init, jax.random.key(0), x, labels)
  assert jax.tree.structure(f32) == jax.tree.structure(bf16)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, f32, bf16)))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16))


@pytest.mark.parametrize('name', sorted(CASES))
def test_bf16_output_is_float32_and_close_to_float32(name):
  """The same (float32) parameters: a float32 checkpoint loads into the bf16 model as is."""
  x, labels = _inputs()
  params = _params(name)
  want = np.asarray(_apply(name)({'params': params}, x, labels))
  out = jax.jit(_bf16_model(name).apply)({'params': params}, x, labels)
  assert out.dtype == jnp.float32
  err = np.linalg.norm(np.asarray(out) - want) / np.linalg.norm(want)
  assert 1e-4 < err < BF16_REL_L2_TOL, err   # > 1e-4: it did compute in bf16


@pytest.mark.parametrize('name', ['ncsnpp', 'ddpm_fir_residual', 'biggan_skip_cat'])
def test_bf16_convolutions_and_matmuls_run_in_bf16(name):
  """No silent promotion back to float32: every convolution (3x3, 1x1, fused and plain FIR
  up/down sampling) and every dot (dense, NIN, attention; the float32 noise-embedding
  features are cast at the first Dense) of the forward pass yields bf16."""
  x, labels = _inputs()
  hlo = jax.jit(_bf16_model(name).apply).lower({'params': _params(name)}, x, labels).as_text()
  convs = _result_dtypes(hlo, 'convolution')
  dots = _result_dtypes(hlo, 'dot_general')
  assert len(convs) > 10 and set(convs) == {'bf16'}, convs
  assert len(dots) > 2 and set(dots) == {'bf16'}, dots
  # The float32 model has no bf16 at all.
  hlo32 = jax.jit(_model(name).apply).lower({'params': _params(name)}, x, labels).as_text()
  assert 'bf16' not in hlo32


@pytest.mark.slow
def test_bf16_config_trains_one_step_through_train_lib():
  """configs/ve/cifar10_ncsnpp_continuous at tiny size with model.dtype='bfloat16': the
  params, optimizer and EMA state stay float32 and one training step gives a finite loss."""
  import builder
  import train_lib
  from configs.ve import cifar10_ncsnpp_continuous
  config = cifar10_ncsnpp_continuous.get_config()
  config.model.update(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,),
                      dtype='bfloat16')
  config.training.batch_size = 4
  config.optim.warmup = 0          # the warmup schedule's first learning rate is 0
  builder.validate_config(config, num_devices=1)
  comp = builder.build_components(config, (4, 4, 3))
  assert comp.model.dtype == jnp.bfloat16
  # init_state's shapes and dtypes; parameters filled with small random values (an eager
  # init of the network would take longer than the step's compile).
  shapes = jax.eval_shape(lambda: train_lib.init_state(config, comp))
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(shapes))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                        shapes.params)
  state = train_lib.TrainState(jnp.zeros((), jnp.int32), params, params, comp.optimizer.init(params))
  step = jax.jit(train_lib.make_train_step(comp, config.model.ema_rate))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 4, 4, 4, 3)), jnp.float32)
  new_state, loss = step(state, {'image': x}, train_lib.train_key(config))
  assert np.all(np.isfinite(np.asarray(loss)))
  moved = jax.tree.map(lambda a, b: float(jnp.sum(jnp.abs(a - b))), new_state.params, params)
  assert sum(jax.tree.leaves(moved)) > 0          # finite float32 gradients reached the params
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(new_state.params))
  for tree in (new_state.params, new_state.ema_params, new_state.opt_state):
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(tree))
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match='model.dtype'):
    builder.validate_config(config, num_devices=1)
