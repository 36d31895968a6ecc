"""The flagship CIFAR-10 config of the vp SDE: DDPM++ continuous, the VP model with exact likelihoods (configs/vp/cifar10_ddpmpp_continuous.py)."""
from configs.vp import cifar10_ddpmpp_continuous


def get_config():
  return cifar10_ddpmpp_continuous.get_config()
