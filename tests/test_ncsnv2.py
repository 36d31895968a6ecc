"""NCSN and NCSNv2 RefineNets: parameter parity with the reference, shapes, norms, sigma scaling.

Compiling dominates (a jitted init of even the tiny nets takes 20 s here), so parameter
trees come from jax.eval_shape, and the tiny networks (nf 8, 16x16) are filled with
NumPy draws of the right scale; the initializers themselves are checked on the norms.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_lib
from models import normalization
from models.ncsnv2 import NCSN, NCSNv2, NCSNv2_128, NCSNv2_256, _resize

# Reference configs (score_sde_pytorch configs/ve/ncsn/*.py, configs/ve/ncsnv2/*.py, with
# their defaults: CIFAR-10 32 px, sigma_max 50; CelebA 64 px, sigma_max 90; LSUN sigma_max
# 378 unless overridden; sigma_min 0.01, 3 channels, nf 128, InstanceNorm++, ELU everywhere)
# as our constructor arguments, with the image size, and the reference PyTorch parameter
# count. The counts were measured with torch 2.x (CPU) on score_sde_pytorch commit
# cb1f359f4aadf0ff9a5e122fe8fffc9451fd6e44, extracted to /tmp/ssp, by
#   /tmp/torchenv/bin/python /tmp/ssp/count_torch.py
# which imports each config, sets config.data.channels = config.data.num_channels (the
# reference model reads a field its configs lack), builds models.ncsnv2.<class>(config) and
# prints sum(p.numel() for p in model.parameters()). For 'ncsn' it makes get_normalization
# return ConditionalInstanceNorm2dPlus: the reference asks for the unconditional norm there,
# which cannot take labels (the conditional one is ermongroup/ncsn's and the JAX reference's
# choice). Buffers are not counted: NCSNv2's only buffer is the sigmas array (num_scales
# floats); the InstanceNorm++ alpha/gamma/beta and the conditional norms' embeddings
# ([num_scales, 3C]) are parameters. NCSN's count grows with num_scales through them.
REFERENCE_CONFIGS = {
    'ncsn/cifar10': (NCSN, dict(num_scales=10, sigma_max=1.0), 32, 30_117_635),
    'ncsn/cifar10_5': (NCSN, dict(num_scales=10, sigma_max=1.0), 32, 30_117_635),
    'ncsn/cifar10_124': (NCSN, dict(num_scales=232, sigma_max=50.0), 32, 39_750_659),
    'ncsn/cifar10_1245': (NCSN, dict(num_scales=232, sigma_max=50.0), 32, 39_750_659),
    'ncsn/celeba': (NCSN, dict(num_scales=10, sigma_max=1.0), 64, 30_117_635),
    'ncsn/celeba_5': (NCSN, dict(num_scales=10, sigma_max=1.0), 64, 30_117_635),
    'ncsn/celeba_124': (NCSN, dict(num_scales=500, sigma_max=90.0), 64, 51_379_715),
    'ncsn/celeba_1245': (NCSN, dict(num_scales=500, sigma_max=90.0), 64, 51_379_715),
    'ncsnv2/cifar10': (NCSNv2, dict(num_scales=232, sigma_max=50.0), 32, 29_694_083),
    'ncsnv2/celeba': (NCSNv2, dict(num_scales=500, sigma_max=90.0), 64, 29_694_083),
    'ncsnv2/bedroom': (NCSNv2_128, dict(num_scales=1086, sigma_max=190.0), 128, 83_445_379),
    # No reference config uses NCSNv2_256; counted on the bedroom config at 256 px.
    'ncsnv2_256 (bedroom at 256 px)': (NCSNv2_256, dict(num_scales=1086, sigma_max=190.0), 256,
                                       94_132_611),
}


def _key():
  return jax.random.key(0, impl='unsafe_rbg')


@functools.cache
def _count(model, size):
  shapes = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes['params']))


@pytest.mark.parametrize('name', sorted(REFERENCE_CONFIGS))
def test_parameter_count_matches_reference(name):
  cls, kwargs, size, expected = REFERENCE_CONFIGS[name]
  assert _count(cls(nf=128, **kwargs), size) == expected


# name: (model, x shape). Tiny versions of every variant and option.
_TINY = dict(nf=8, num_scales=5, sigma_min=0.1, sigma_max=10.0)
CASES = {
    'ncsnv2': (NCSNv2(**_TINY), (3, 16, 16, 3)),
    'ncsnv2_128': (NCSNv2_128(**_TINY), (2, 16, 16, 3)),
    'ncsnv2_256': (NCSNv2_256(**_TINY), (2, 8, 8, 1)),
    'ncsnv2_variancenorm_swish_nearest_centered': (
        NCSNv2(normalization='VarianceNorm', nonlinearity='swish', interpolation='nearest_neighbor',
               centered=True, **_TINY), (2, 16, 16, 3)),
    'ncsnv2_groupnorm_lrelu_8x8': (NCSNv2(normalization='GroupNorm', nonlinearity='lrelu', **_TINY),
                                   (2, 8, 8, 3)),
    'ncsn': (NCSN(**_TINY), (3, 16, 16, 3)),
}


def _fill(path, leaf, rng):
  """A NumPy draw for one parameter: fan-in scaled kernels, scales near 1, small shifts."""
  name = path[-1].key
  if name == 'kernel':
    return rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
  if name in ('alpha', 'gamma', 'weight', 'scale', 'embedding'):
    return 1.0 + 0.1 * rng.standard_normal(leaf.shape)
  return 0.1 * rng.standard_normal(leaf.shape)


@functools.cache
def _params(name):
  model, shape = CASES[name]
  shapes = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct((1,) + shape[1:], jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))['params']
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(_fill(path, leaf, rng), jnp.float32), shapes)


@functools.cache
def _apply(name):
  # XLA's backend optimizations double the compile time here and buy nothing for a few calls.
  return jax.jit(CASES[name][0].apply, compiler_options={'xla_backend_optimization_level': 0})


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


@pytest.mark.parametrize('name', sorted(CASES))
def test_shape_finite_and_per_example(name):
  model, shape = CASES[name]
  x = _images(shape)
  labels = jnp.arange(shape[0], dtype=jnp.int32) % model.num_scales
  out = _apply(name)({'params': _params(name)}, x, labels)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out))) and float(jnp.std(out)) > 1e-4
  # Changing the last example leaves the others' outputs unchanged (no batch statistics).
  x2 = x.at[-1].set(_images(shape[1:], seed=1))
  out2 = _apply(name)({'params': _params(name)}, x2, labels)
  np.testing.assert_allclose(np.asarray(out2[:-1]), np.asarray(out[:-1]), rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(out2[-1] - out[-1]))) > 1e-4


def test_ncsnv2_output_scales_as_one_over_sigma():
  model, shape = CASES['ncsnv2']
  x = jnp.broadcast_to(_images(shape[1:]), shape)
  labels = jnp.array([0, 2, 4], jnp.int32)
  out = np.asarray(_apply('ncsnv2')({'params': _params('ncsnv2')}, x, labels), np.float64)
  # The levels are the VE SDE's, in label order (float32, as the network divides by them).
  sde = sde_lib.VESDE(sigma_min=_TINY['sigma_min'], sigma_max=_TINY['sigma_max'],
                      N=_TINY['num_scales'])
  sigmas = np.asarray(sde.descending_sigmas, np.float64)
  np.testing.assert_allclose(sigmas, np.geomspace(10.0, 0.1, 5), rtol=1e-6)  # label 0 = sigma_max
  unscaled = out * sigmas[np.asarray(labels)][:, None, None, None]
  # The network is label-independent, so f(x) = sigma_label * output for every label.
  np.testing.assert_allclose(unscaled[1], unscaled[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(unscaled[2], unscaled[0], rtol=1e-4, atol=1e-6)


def test_ncsn_output_depends_on_label():
  model, shape = CASES['ncsn']
  x = jnp.broadcast_to(_images(shape[1:]), shape)
  labels = jnp.array([0, 0, 3], jnp.int32)
  out = _apply('ncsn')({'params': _params('ncsn')}, x, labels)
  np.testing.assert_allclose(np.asarray(out[1]), np.asarray(out[0]), rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(out[2] - out[0]))) > 1e-3 * float(jnp.max(jnp.abs(out[0])))


def test_parameter_tree_names_follow_reference():
  params = _params('ncsnv2')
  # Pytrees sort dict keys, so names, not positions, carry the mapping to the reference.
  stages = {f'res{k}_{j}' for k in (1, 2, 3, 4) for j in (0, 1)}
  refines = {f'refine{k}' for k in (1, 2, 3, 4)}
  assert set(params) == {'begin_conv', 'normalizer', 'end_conv'} | stages | refines
  assert 'msf' not in params['refine1'] and 'shortcut' not in params['res1_0']
  assert set(params['res2_0']) == {'normalize1', 'conv1', 'normalize2', 'conv2', 'shortcut'}
  assert set(params['refine4']) == {'adapt_convs_0', 'adapt_convs_1', 'msf', 'crp', 'output_convs'}
  assert set(params['refine4']['output_convs']) == {f'{i}_{j}_conv' for i in (1, 2, 3) for j in (1, 2)}
  cond = _params('ncsn')
  assert cond['refine1']['crp']['norms_0']['embed']['embedding'].shape == (5, 3 * 16)


def _numpy_instance_norm_plus(x, gamma, alpha, beta, eps=1e-5):
  """InstanceNorm++ written directly (NHWC), unbiased variance across channel means."""
  mu = x.mean(axis=(1, 2), keepdims=True)
  s2 = ((x - mu) ** 2).mean(axis=(1, 2), keepdims=True)
  m = mu.mean(axis=-1, keepdims=True)
  v = ((mu - m) ** 2).sum(axis=-1, keepdims=True) / (x.shape[-1] - 1)
  return gamma * ((x - mu) / np.sqrt(s2 + eps) + alpha * (mu - m) / np.sqrt(v + eps)) + beta


def test_instance_norm_plus_matches_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (2, 5, 4, 6)) + rng.normal(size=(2, 1, 1, 6))
  gamma, alpha, beta = (rng.normal(size=6) for _ in range(3))
  params = {'gamma': gamma, 'alpha': alpha, 'beta': beta}
  out = normalization.InstanceNormPlus().apply({'params': params}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(out, _numpy_instance_norm_plus(x, gamma, alpha, beta), rtol=1e-4, atol=1e-4)

  # Conditional: row y of the [num_classes, 3C] embedding is (gamma, alpha, beta).
  table = rng.normal(size=(3, 18))
  y = np.array([2, 0])
  out = normalization.ConditionalInstanceNormPlus(num_classes=3).apply(
      {'params': {'embed': {'embedding': table}}}, jnp.asarray(x, jnp.float32), jnp.asarray(y))
  rows = table[y][:, None, None, :]
  expected = _numpy_instance_norm_plus(x, rows[..., :6], rows[..., 6:12], rows[..., 12:])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_norm_initialization():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 8)), jnp.float32)
  params = normalization.InstanceNormPlus().init(_key(), x)['params']
  for name in ('alpha', 'gamma'):
    assert params[name].shape == (8,) and float(jnp.max(jnp.abs(params[name] - 1))) < 0.2
  np.testing.assert_array_equal(params['beta'], np.zeros(8))
  table = normalization.ConditionalInstanceNormPlus(num_classes=5).init(
      _key(), x, jnp.zeros((2,), jnp.int32))['params']['embed']['embedding']
  assert table.shape == (5, 24)  # (gamma, alpha, beta) per label
  assert float(jnp.max(jnp.abs(table[:, :16] - 1))) < 0.2 and float(jnp.std(table[:, :16])) > 1e-3
  np.testing.assert_array_equal(table[:, 16:], np.zeros((5, 8)))


@pytest.mark.parametrize('name', ['InstanceNorm++', 'InstanceNorm', 'VarianceNorm', 'GroupNorm'])
@pytest.mark.parametrize('conditional', [False, True])
def test_every_normalization_runs(name, conditional):
  if conditional and name == 'GroupNorm':
    with pytest.raises(ValueError, match='valid'):
      normalization.get_normalization(name, conditional=True)
    return
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 8)), jnp.float32)
  y = jnp.array([0, 2], jnp.int32)
  norm = normalization.get_normalization(name, conditional=conditional)
  module, args = (norm(num_classes=3), (x, y)) if conditional else (norm(), (x,))
  out = jax.jit(lambda *a: module.apply(module.init(_key(), *a), *a))(*args)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
  # Every choice leaves each channel of each image with about unit scale.
  assert 0.5 < float(jnp.std(out)) < 2.0


def test_bilinear_resize_aligns_corners():
  x = jnp.asarray(np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1))
  out = np.asarray(_resize(x, (3, 5), 'bilinear'))[0, :, :, 0]
  # align_corners=True: output pixel i samples input i (n - 1) / (size - 1).
  expected = np.array([[0, 0.5, 1, 1.5, 2], [1.5, 2, 2.5, 3, 3.5], [3, 3.5, 4, 4.5, 5]])
  np.testing.assert_allclose(out, expected, rtol=1e-6)
