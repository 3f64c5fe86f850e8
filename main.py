"""Trains and evaluates a Perceiver image classifier.

  python main.py --config=configs/cifar100.py --workdir=/tmp/perceiver_cifar100

Any config field can be overridden, e.g. `--config.num_epochs=2`. Rerunning
with the same --workdir resumes from its latest checkpoint.
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
  from perceiver_jax import config_lib  # pylint: disable=g-import-not-at-top
  from perceiver_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (config_lib.ConfigError, ValueError) as e:
    # Bad input: one clear paragraph instead of a traceback.
    logging.debug('Details:', exc_info=True)
    sys.exit(f'Error: {e}')


if __name__ == '__main__':
  app.run(main)
