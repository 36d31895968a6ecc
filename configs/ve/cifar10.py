"""The flagship CIFAR-10 config of the ve SDE: NCSN++ continuous, the paper's best VE model (configs/ve/cifar10_ncsnpp_continuous.py)."""
from configs.ve import cifar10_ncsnpp_continuous


def get_config():
  return cifar10_ncsnpp_continuous.get_config()
