"""Class-conditional CIFAR-10 (SDE paper, section 5): the VE NCSN++ continuous score model
with a noise-conditional Wide ResNet 28-10 classifier for guidance.

  python main.py --config configs/ve/cifar10_classifier.py --workdir DIR --mode train_classifier
  python main.py --config configs/ve/cifar10_classifier.py --workdir DIR --mode conditional

(the score model's checkpoint in DIR, trained or imported with checkpoint_import.py).
"""
from configs.ve import cifar10_ncsnpp_continuous


def get_config():
  config = cifar10_ncsnpp_continuous.get_config()
  c = config.classifier
  c.model = 'wideresnet'
  c.depth = 28
  c.widen = 10
  c.dropout = 0.0
  c.batch_size = 128
  c.lr = 2e-4
  c.n_iters = 100_000
  c.checkpoint_freq = 2000
  c.eps = 1e-5
  config.conditional.samples_per_class = 10
  return config
