"""Trains and evaluates a Perceiver image classifier.

  python main.py --config=configs/cifar100.py --workdir=/tmp/perceiver_cifar100

Any config field can be overridden, e.g. `--config.num_epochs=2`. Rerunning
with the same --workdir resumes from its latest checkpoint. For several
hosts, run the same command on each with `--distributed` (TPU slices) or
with `--coordinator_address`, `--num_processes` and `--process_id`.

Tools on a trained workdir (its saved config; --config is not needed):
  python main.py --mode=eval --workdir=DIR
  python main.py --mode=predict --workdir=DIR --images=a.png,b.jpg
  python main.py --mode=attention --workdir=DIR --num_images=8 --output=a.png
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from perceiver_jax import host_memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file, e.g. configs/cifar100.py. '
    'Required to train; the other modes use the workdir\'s saved config and '
    'take only --config.FIELD overrides of '
    'batch_size, tfds_data_dir, dtype and attention_impl.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'predict', 'attention'],
    'train: train and test. eval: test the best checkpoint of --workdir. '
    'predict: top-5 classes of --images. attention: cross-attention maps of '
    '--num_images test images, written to --output.')
flags.DEFINE_list('images', [], '--mode=predict: image files (PNG, JPEG, '
                  '...), comma-separated; they may also follow the flags.')
flags.DEFINE_integer('num_images', 8, '--mode=attention: test images (rows).')
flags.DEFINE_string('output', None, '--mode=attention: PNG to write; default '
                    'WORKDIR/attention_maps.png.')
flags.DEFINE_integer('num_latents', 4, '--mode=attention: single latents to '
                     'show besides their mean.')
flags.DEFINE_string('attention_iteration', 'last', '--mode=attention: which '
                    'iteration\'s cross-attention: last, mean or 1..T.')
flags.DEFINE_bool('distributed', False,
                  'Multi-host run: call jax.distributed.initialize(), which '
                  'needs no arguments on Cloud TPU slices.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 (multi-host GPU/CPU runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.DEFINE_enum(
    'host_memory', 'auto', host_memory.MODES,
    "retain: set glibc's malloc to keep freed memory, so the CPU train step "
    'does not fault in its gigabytes of buffers every step. auto: retain '
    'unless a GPU/TPU plugin is installed. system: the allocator defaults.')
flags.mark_flags_as_required(['workdir'])


class _QuietLibraries(std_logging.Filter):
  """Hides orbax's per-save INFO chatter; its warnings still show."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING
            or '/orbax/' not in record.pathname)


def _run_tool(argv):
  """--mode=eval, predict or attention, on the workdir's saved config."""
  # pylint: disable=g-import-not-at-top
  from perceiver_jax import attention_maps
  from perceiver_jax import inference
  from perceiver_jax import predict
  # pylint: enable=g-import-not-at-top
  overrides = {} if FLAGS.config is None else dict(
      config_flags.get_override_values(FLAGS['config']))
  if FLAGS.mode == 'eval':
    inference.evaluate(FLAGS.workdir, overrides=overrides)
  elif FLAGS.mode == 'predict':
    predict.run(FLAGS.workdir, list(FLAGS.images) + list(argv[1:]),
                overrides=overrides)
  else:
    attention_maps.run(FLAGS.workdir, num_images=FLAGS.num_images,
                       output=FLAGS.output, num_latents=FLAGS.num_latents,
                       iteration=FLAGS.attention_iteration,
                       overrides=overrides)


def main(argv):
  if len(argv) > 1 and FLAGS.mode != 'predict':
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.mode == 'train' and FLAGS.config is None:
    raise app.UsageError('--config is required to train, e.g. '
                         '--config=configs/cifar100.py.')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before the JAX backend starts its threads.
  if host_memory.configure(FLAGS.host_memory):
    logging.info('Host memory: freed memory is kept for reuse '
                 '(--host_memory=system to turn off).')
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
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      _run_tool(argv)
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
