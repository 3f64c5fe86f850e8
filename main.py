"""Trains and evaluates a Perceiver image classifier.

  python main.py --config=configs/cifar100.py --workdir=/tmp/perceiver_cifar100

Any config field can be overridden, e.g. `--config.num_epochs=2`. Rerunning
with the same --workdir resumes from its latest checkpoint. For several
hosts, run the same command on each with `--distributed` (TPU slices) or
with `--coordinator_address`, `--num_processes` and `--process_id`.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file, e.g. configs/cifar100.py.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.DEFINE_bool('distributed', False,
                  'Multi-host run: call jax.distributed.initialize(), which '
                  'needs no arguments on Cloud TPU slices.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 (multi-host GPU/CPU runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(std_logging.Filter):
  """Hides orbax's per-save INFO chatter; its warnings still show."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING
            or '/orbax/' not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so `--help` and flag errors do not wait for jax/tensorflow.
  # pylint: disable=g-import-not-at-top
  from perceiver_jax import metrics
  from perceiver_jax import preemption
  from perceiver_jax import sharding
  from perceiver_jax import train
  # pylint: enable=g-import-not-at-top
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes,
              FLAGS.process_id)
  if FLAGS.distributed or any(v is not None for v in explicit):
    sharding.initialize_distributed(*explicit)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:
    logging.warning('%s', e)
    sys.exit(preemption.EXIT_CODE)
  except (ValueError, metrics.NonFiniteError) as e:
    # Bad input or a diverged run: one clear paragraph, no traceback
    # (`--verbosity=1` logs it).
    logging.debug('Details:', exc_info=True)
    sys.exit(f'Error: {e}')


if __name__ == '__main__':
  app.run(main)
