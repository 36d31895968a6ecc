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

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/toy/mixture.py', 'Config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples, metrics and reports.')
flags.DEFINE_enum('mode', 'all', ['train', 'eval', 'sample', 'stats', 'all', 'train_classifier',
                                  'conditional', 'inverse'], 'What to run.')
flags.DEFINE_bool('multihost', False, 'Join other processes with jax.distributed.initialize.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multihost, non-TPU).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multihost, non-TPU).')
flags.DEFINE_integer('process_id', None, 'This process index (multihost, non-TPU).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import run_lib
  import train_lib
  try:
    paths = run_lib.run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except train_lib.Preempted as e:   # SIGINT / SIGTERM while training: the state is saved
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print('Interrupted.', file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  if jax.process_index() != 0:   # process 0 writes the files: the others have nothing to say
    return
  for path in paths:
    print(f'Wrote {path}')
  if FLAGS.mode == 'all' and paths:
    import json
    with open(paths[-1]) as f:
      report = json.load(f)
    print(f"Picture: {report.get('samples_png')}\nReport: {paths[-1]}")


if __name__ == '__main__':
  app.run(main)
