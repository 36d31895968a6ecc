"""Converts pytorch-fid's FID Inception weights (.pth) into inception.InceptionV3 variables.

    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/\
pt_inception-2015-12-05-6726825d.pth
    python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth \
        inception_fid.msgpack

Reading the .pth needs torch (CPU is enough: pip install torch). The source must be
pytorch-fid's file, byte for byte (evaluation.PYTORCH_FID_WEIGHTS_SHA256): no other network
gives FID/KID/IS comparable with published numbers. Writes the flax msgpack and, next to it,
``<out>.sha256`` (sha256sum format: the converted file's hash, then the source's), which
evaluation.load_inception_variables checks at every load. Every tensor of the state dict
lands in the variables (conv OIHW -> HWIO, BatchNorm -> scale/bias + mean/var, fc transposed);
the converted file is checked by converting it back.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.serialization  # noqa: E402
import numpy as np  # noqa: E402

import evaluation  # noqa: E402
from models import inception  # noqa: E402


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth state dict as name -> float32 numpy array (needs torch)."""
  try:
    import torch
  except ImportError as e:
    raise SystemExit('reading a .pth file needs torch: pip install torch '
                     '(the CPU build is enough), then run this script again') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  if 'state_dict' in state and not hasattr(state['state_dict'], 'shape'):
    state = state['state_dict']
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert(state_dict: dict[str, np.ndarray]) -> bytes:
  """State dict -> msgpack bytes of InceptionV3 variables, checked by converting back."""
  variables = inception.inception_variables_from_torch(state_dict)
  back = inception.inception_state_dict(variables)
  expected = {k: v for k, v in state_dict.items()
              if not k.startswith('AuxLogits.') and not k.endswith('num_batches_tracked')}
  if set(back) != set(expected):
    raise ValueError(f'tensors lost or invented: {sorted(set(back) ^ set(expected))}')
  for k, v in expected.items():
    if back[k].shape != v.shape or not np.array_equal(back[k], np.asarray(v, np.float32)):
      raise ValueError(f'{k} did not survive the round trip')
  return flax.serialization.msgpack_serialize(variables)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('source', help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument('out', help='the flax weights to write, e.g. inception_fid.msgpack')
  args = parser.parse_args()

  source_sha = evaluation.file_sha256(args.source)
  if source_sha != evaluation.PYTORCH_FID_WEIGHTS_SHA256:
    size = os.path.getsize(args.source)
    raise SystemExit(
        f"{args.source}: sha256 {source_sha} ({size:,} bytes) is not pytorch-fid's "
        f'weights (sha256 {evaluation.PYTORCH_FID_WEIGHTS_SHA256}, '
        f'{evaluation.PYTORCH_FID_WEIGHTS_BYTES:,} bytes): download '
        f'{evaluation.PYTORCH_FID_WEIGHTS_URL} again')
  data = convert(read_torch_state_dict(args.source))
  tmp = args.out + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, args.out)
  digest = evaluation.write_weights_record(args.out, source_sha, os.path.basename(args.source))
  print(f'source sha256 {source_sha}')
  print(f'wrote {args.out} (sha256 {digest}) and {args.out}.sha256')


if __name__ == '__main__':
  main()
