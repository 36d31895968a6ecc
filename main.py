"""Entry point: python main.py --config CONFIG --workdir DIR --mode MODE.

Modes: train | eval | sample | stats | all (train, then eval) | train_classifier (the noise-
conditional classifier of class guidance) | conditional (class-guided samples) | inverse
(posterior samples for measured test images: inpainting, super-resolution, MRI, CT, ...).

--mode stats computes the dataset statistics that FID/KID compare with (eval_lib.compute_stats):
once per dataset, before eval on image data (digits compute theirs on the fly).

Several hosts (TPU pods, GPU clusters): start the same command on every host with
--multihost (TPU pods find each other); elsewhere also pass --coordinator_address,
--num_processes and --process_id.
"""
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/toy/mixture.py', 'Config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples, metrics and reports.')
flags.DEFINE_enum('mode', 'all', ['train', 'eval', 'sample', 'stats', 'all', 'train_classifier',
                                  'conditional', 'inverse'], 'What to run.')
flags.DEFINE_bool('allow_config_change', False,
                  'Go on from the checkpoints of a workdir made with another model, SDE or data '
                  'config (fine-tuning); without it such a run is refused.')
flags.DEFINE_bool('verbose', False, 'Print the traceback of a user error (bad setting, path, file).')
flags.DEFINE_bool('multihost', False, 'Join other processes with jax.distributed.initialize.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multihost, non-TPU).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multihost, non-TPU).')
flags.DEFINE_integer('process_id', None, 'This process index (multihost, non-TPU).')
flags.mark_flags_as_required(['workdir'])


def parse_flags(argv):
  """absl's parsing; an unreadable --config or --config.* override is one line, no traceback."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()   # a missing file fails only when the config is first read
    return remaining
  except Exception as e:  # noqa: BLE001 (the config file's own code can raise anything)
    if '--verbose' in argv:
      raise
    if isinstance(e, flags.Error):   # absl's own: a bad value, an unknown flag
      sys.exit(f'error: {e}')
    sys.exit(f'error: {errors.config_flag_message(e, argv)}')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  paths = errors.run_reporting(_run, FLAGS.verbose)
  for path in paths:
    print(f'Wrote {path}')
  if FLAGS.mode == 'all' and paths:
    import json
    with open(paths[-1]) as f:
      report = json.load(f)
    print(f"Picture: {report.get('samples_png')}\nReport: {paths[-1]}")


def _run():
  """The mode's paths written by this process (process 0 writes the files, the others none)."""
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import run_lib
  import train_lib
  try:
    paths = run_lib.run(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.allow_config_change)
  except train_lib.Preempted as e:   # SIGINT / SIGTERM while training: the state is saved
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print('Interrupted.', file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  return paths if jax.process_index() == 0 else []


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
