"""classifier_lib.py and models/classifier.py: the noise-conditional classifier (training,
resume, accuracy per noise level) and class-conditional sampling from the entry point."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import classifier_lib
import train_lib
from models import classifier as classifier_models
from run_helpers import main_process, tiny_digits_config


def _classifier_config(data_dir, n_iters=300, checkpoint_freq=100):
  config = tiny_digits_config(data_dir)
  config.classifier.update(n_iters=n_iters, checkpoint_freq=checkpoint_freq, batch_size=64, nf=16, lr=2e-3,
                           eval_times=(0.001, 0.1, 1.0))
  return config


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A tiny digits classifier, trained once for this module's tests."""
  workdir = str(tmp_path_factory.mktemp('classifier'))
  config = _classifier_config(data_dir)
  path = classifier_lib.train_classifier(config, workdir)
  return config, workdir, json.load(open(path))


@pytest.mark.slow
def test_classifier_learns_clean_digits_and_knows_nothing_at_the_prior(trained):
  """VP SDE: at t = 0.001 the images are clean, at t = 1 the signal is e^-5 of the noise."""
  _, _, report = trained
  acc = dict(zip(report['eval_times'], report['accuracy']))
  assert report['num_examples'] == 297          # the whole digits test split
  assert acc[0.001] > 0.85, acc                  # measured 0.93 after 300 steps
  assert acc[1.0] < 0.2, acc                     # chance is 0.1
  assert acc[0.001] >= acc[0.1] >= acc[1.0] - 0.05, acc


@pytest.mark.slow
def test_classifier_training_resumes_to_the_same_parameters(data_dir, tmp_path):
  # A few steps suffice (the resume is exact whatever the count); the accuracy report that
  # each run writes is not under test here, so it is made at one noise level.
  config = _classifier_config(data_dir, n_iters=6, checkpoint_freq=3)
  config.classifier.eval_times = (1.0,)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  classifier_lib.train_classifier(config, straight)
  config_half = _classifier_config(data_dir, n_iters=3, checkpoint_freq=3)
  config_half.classifier.eval_times = (1.0,)
  classifier_lib.train_classifier(config_half, resumed)          # as if killed at step 3
  classifier_lib.train_classifier(config, resumed)
  a = open(os.path.join(straight, 'classifier', 'checkpoint.msgpack'), 'rb').read()
  b = open(os.path.join(resumed, 'classifier', 'checkpoint.msgpack'), 'rb').read()
  assert a == b


def test_damaged_classifier_checkpoint_is_not_trusted(trained, tmp_path):
  config, workdir, _ = trained
  damaged = tmp_path / 'classifier'
  damaged.mkdir()
  data = open(os.path.join(workdir, 'classifier', 'checkpoint.msgpack'), 'rb').read()
  (damaged / 'checkpoint.msgpack').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='checkpoint.msgpack is damaged'):
    classifier_lib.train_classifier(config, str(tmp_path))


@pytest.mark.slow
def test_conditional_mode_writes_a_grid_and_the_target_accuracy(trained, data_dir):
  """The entry point end to end on a 2-step score model: the mechanics, not the quality
  (README's measured figures come from a trained model)."""
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.sde.num_scales = 25    # VP's Langevin step needs N >= 20 (alpha = 1 - beta_max / N >= 0)
  train_lib.train(config, workdir)
  args = ['--mode', 'conditional', '--workdir', workdir, '--config.model.nf=8', '--config.model.ch_mult=(1,)', '--config.model.embed_dim=16',
          '--config.sde.num_scales=25', '--config.training.n_iters=2',
          '--config.training.batch_size=16', '--config.classifier.n_iters=300',
          '--config.classifier.nf=16', '--config.classifier.batch_size=64',
          '--config.conditional.samples_per_class=2', '--config.conditional.scale=2.0']
  proc = main_process(args, data_dir, config_file='configs/vp/digits.py')
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  report = json.load(open(os.path.join(workdir, 'conditional', 'report_2_scale_2.json')))
  assert report['num_samples'] == 20 and report['scale'] == 2.0 and report['all_finite']
  assert report['nfe'] == 25 * 2                 # reverse diffusion + Langevin per level
  assert 0.0 <= report['target_accuracy'] <= 1.0 and len(report['target_accuracy_per_class']) == 10
  assert os.path.isfile(report['samples_png'])


def test_classifier_networks_and_their_errors():
  x, t = jnp.zeros((2, 8, 8, 3)), jnp.array([0.1, 0.9])
  wrn = classifier_models.NoiseConditionalWideResNet(depth=10, widen=1)
  params = jax.eval_shape(wrn.init, jax.random.PRNGKey(0), x, t)     # shapes only: no compile
  assert jax.eval_shape(wrn.apply, params, x, t).shape == (2, 10)
  with pytest.raises(ValueError, match='depth must be 6 n \\+ 4, got 12'):
    jax.eval_shape(classifier_models.NoiseConditionalWideResNet(depth=12).init,
                   jax.random.PRNGKey(0), x, t)
  with pytest.raises(ValueError, match=r"Unknown classifier 'resnet'.*'cnn', 'wideresnet'"):
    classifier_models.get_classifier('resnet')
  cnn = classifier_models.NoiseConditionalCNN(nf=8)
  params = cnn.init(jax.random.PRNGKey(0), x, t)
  a = cnn.apply(params, x + 1.0, jnp.array([0.1, 0.1]))
  b = cnn.apply(params, x + 1.0, jnp.array([0.9, 0.9]))
  assert not np.allclose(a, b), 'the logits must depend on t'


def test_cifar10_classifier_config_builds_a_wide_resnet_28_10():
  from configs.ve import cifar10_classifier
  config = cifar10_classifier.get_config()
  model = classifier_lib.make_classifier(config)
  assert isinstance(model, classifier_models.NoiseConditionalWideResNet)
  assert (model.depth, model.widen) == (28, 10)
  x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  # WRN-28-10 has 36.5 M parameters; the time embedding adds a 128 -> width projection per
  # block (0.57 M) and its own two layers: 37.10 M.
  assert 37.0e6 < count < 37.2e6, count
