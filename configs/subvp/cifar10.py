"""The flagship CIFAR-10 config of the subvp SDE: DDPM++ continuous under sub-VP (configs/subvp/cifar10_ddpmpp_continuous.py)."""
from configs.subvp import cifar10_ddpmpp_continuous


def get_config():
  return cifar10_ddpmpp_continuous.get_config()
