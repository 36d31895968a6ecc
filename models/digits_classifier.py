"""The small CNN behind digits-FID/KID/IS: 8x8x1 digits -> (64-d features, 10 logits).

Its weights are the committed assets/digits_classifier.msgpack, trained by
scripts/train_digits_classifier.py; evaluation.DigitsEvaluator runs it.
"""
import flax.linen as nn
import jax.numpy as jnp


class DigitsClassifier(nn.Module):
  """A small CNN on 8x8x1 digits in [0, 1]: (penultimate features [B, 64], logits [B, 10])."""
  num_features: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32) * 2. - 1.
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))                 # [B, 4, 4, 16]
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))                 # [B, 2, 2, 32]
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.num_features)(x))
    return features, nn.Dense(self.num_classes)(features)
