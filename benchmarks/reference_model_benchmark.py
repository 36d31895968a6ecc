#!/usr/bin/env python
"""Times the reference PyTorch NCSN++ (yang-song/score_sde_pytorch) beside ours.

Run by benchmarks/model_benchmark.py with the reference's Python (torch installed) as a
subprocess; it imports the reference from --reference_dir (nothing of it is copied here).
For one config and batch: seconds per forward pass (eval mode, no gradients) and per
training step (the reference's continuous DSM loss, backward, Adam), after one warm-up
call each, with torch.set_num_threads(--threads). The reference's `op` package builds a
CUDA extension when imported; on a CPU-only machine the build is skipped (its
`upfirdn2d` then runs the reference's own pure-torch path). Prints one JSON line.

Usage:
  /path/to/torch/python benchmarks/reference_model_benchmark.py --reference_dir /tmp/ssp \
      --config ve/cifar10_ncsnpp_continuous --batch 8 --steps 2 --threads 2
"""
import argparse
import importlib
import json
import sys
import time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--reference_dir', required=True)
  parser.add_argument('--config', default='ve/cifar10_ncsnpp_continuous')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--threads', type=int, default=1)
  parser.add_argument('--image_size', type=int, default=0, help='override (0: the config\'s)')
  parser.add_argument('--tiny', action='store_true', help='shrink the network (development)')
  args = parser.parse_args()

  import torch
  import torch.utils.cpp_extension
  torch.set_num_threads(args.threads)
  if not torch.cuda.is_available():
    torch.utils.cpp_extension.load = lambda *a, **k: None   # no CUDA build on CPU
  sys.path.insert(0, args.reference_dir)
  config = importlib.import_module('configs.' + args.config.replace('/', '.')).get_config()
  if args.image_size:
    config.data.image_size = args.image_size
  if args.tiny:
    config.model.nf = 16
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (config.data.image_size // 2,)
  config.device = torch.device('cpu')
  from models import ncsnpp  # noqa: F401  (registers the model)
  from models import utils as mutils
  import losses
  import sde_lib
  torch.manual_seed(0)
  model = mutils.get_model(config.model.name)(config).to(config.device)
  sde = sde_lib.VESDE(sigma_min=config.model.sigma_min, sigma_max=config.model.sigma_max,
                      N=config.model.num_scales)
  optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
  loss_fn = losses.get_sde_loss_fn(sde, train=True, reduce_mean=config.training.reduce_mean,
                                   continuous=True, likelihood_weighting=False)
  shape = (args.batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  x = torch.rand(shape)
  labels = torch.full((args.batch,), 0.5)

  def forward():
    model.eval()
    with torch.no_grad():
      return model(x, labels)

  def train_step():
    model.train()
    optimizer.zero_grad()
    loss = loss_fn(model, x)
    loss.backward()
    optimizer.step()
    return loss

  def timed(fn):
    fn()                                    # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
      fn()
    return (time.perf_counter() - t0) / args.steps

  result = dict(config=args.config, batch=args.batch, steps=args.steps, threads=args.threads,
                torch=torch.__version__, device=str(config.device),
                parameters=sum(p.numel() for p in model.parameters()),
                forward_s=timed(forward), train_step_s=timed(train_step))
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
