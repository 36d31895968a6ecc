"""Trains the digits classifier behind digits-FID/KID/IS and writes its weights.

    python scripts/train_digits_classifier.py [--out assets/digits_classifier.msgpack]

Deterministic (fixed seeds, full-batch-order permutations from a numpy Generator, CPU XLA);
trains on the digits train split (1500 images) and prints the accuracy on the 297 held-out
test digits. Under a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.serialization  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import evaluation  # noqa: E402
from models import digits_classifier  # noqa: E402


def train(images, labels, *, seed: int, epochs: int, batch_size: int, lr: float,
          weight_decay: float):
  """Adam(W) on cross-entropy with random one-pixel shifts; returns the params."""
  model = digits_classifier.DigitsClassifier()
  params = model.init(jax.random.PRNGKey(seed), images[:1])['params']
  steps = epochs * (len(images) // batch_size)
  optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      _, logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
  for epoch in range(epochs):
    order = rng.permutation(len(images))
    for i in range(len(images) // batch_size):
      idx = order[i * batch_size:(i + 1) * batch_size]
      # Augmentation: shift each digit by up to one pixel (zero fill).
      dy, dx = rng.integers(0, 3, size=(2, len(idx)))
      x = np.stack([padded[j, a:a + 8, b:b + 8] for j, a, b in zip(idx, dy, dx)])
      params, opt_state, loss = step(params, opt_state, jnp.asarray(x), jnp.asarray(labels[idx]))
    if (epoch + 1) % 10 == 0:
      print(f'epoch {epoch + 1}: loss {float(loss):.4f}')
  return params


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=evaluation.DIGITS_CLASSIFIER_PATH)
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--epochs', type=int, default=60)
  parser.add_argument('--batch_size', type=int, default=50)
  parser.add_argument('--lr', type=float, default=3e-3)
  parser.add_argument('--weight_decay', type=float, default=1e-4)
  args = parser.parse_args()

  start = time.time()
  train_x, train_y = evaluation.load_digits('train', args.data_dir)
  test_x, test_y = evaluation.load_digits('test', args.data_dir)
  params = train(train_x, train_y, seed=args.seed, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay)
  data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'wb') as f:
    f.write(data)

  evaluator = evaluation.DigitsEvaluator(args.out)
  accuracy = float(np.mean(np.argmax(evaluator(test_x)[1], -1) == test_y))
  num_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
  print(f'wrote {args.out}: {num_params} parameters, {len(data)} bytes, '
        f'sha256 {evaluation.file_sha256(args.out)}')
  print(f'held-out test accuracy: {accuracy:.4f} ({len(test_y)} digits); '
        f'{time.time() - start:.1f} s')


if __name__ == '__main__':
  main()
