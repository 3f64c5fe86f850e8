"""Trains and evaluates a Perceiver image classifier.

  python main.py --config=configs/cifar100.py

writes to `runs/cifar100` under the current directory (`--workdir=DIR` to
choose). Any config field can be overridden, e.g. `--config.num_epochs=2`.
Rerunning with the same workdir resumes from its latest checkpoint. For
several hosts, run the same command on each with `--distributed` (TPU
slices) or with `--coordinator_address`, `--num_processes` and
`--process_id`.

Tools on a trained workdir (its saved config; --config is not needed):
  python main.py --mode=eval --workdir=DIR
  python main.py --mode=predict --workdir=DIR --images=a.png,b.jpg
  python main.py --mode=attention --workdir=DIR --num_images=8 --output=a.png
Before a long run, decode every record it would read (no accelerator used;
exit status 1 when a record does not decode):
  python main.py --mode=check_data --config=configs/imagenet_perceiver.py

Another implementation's weights as a workdir the tools and
`--config.init_from` use (Perceiver IO's classifiers, HuggingFace's or
DeepMind's haiku checkpoints):
  python main.py --mode=import --source=HF_FOLDER --workdir=DIR
  python main.py --mode=import --source=FILE.pystate --workdir=DIR

Python 3.11 or later. `--help` and flag errors come back at once: jax and
tensorflow are imported only once the flags are valid.
"""

import logging as std_logging
import os
import sys

MIN_PYTHON = (3, 11)


def check_python(version=sys.version_info):
  """Stops with one line on a Python older than the pinned packages need."""
  if tuple(version[:2]) < MIN_PYTHON:
    sys.exit(f'Error: perceiver_jax needs Python {MIN_PYTHON[0]}.'
             f'{MIN_PYTHON[1]} or later (the versions in requirements.txt '
             f'do); this is Python {version[0]}.{version[1]}. Create the '
             'virtual environment with python3.11 or newer.')


check_python()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.training import host_memory
# pylint: enable=g-import-not-at-top,wrong-import-position

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'configs')
RUNS_DIR = 'runs'  # Default workdirs: runs/<config name>, under the cwd.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file, e.g. configs/cifar100.py. '
    'Required to train; the other modes use the workdir\'s saved config and '
    'take only --config.FIELD overrides of '
    + ', '.join(config_lib.TOOL_OVERRIDABLE_FIELDS) + '.',
    lock_config=True)
flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints and logs (local, NFS or '
    f'gs://). Default: {RUNS_DIR}/<config name> under the current directory.')
flags.DEFINE_enum(
    'mode', 'train',
    ['train', 'eval', 'predict', 'attention', 'check_data', 'import'],
    'train: train and test. eval: test the weights training tested (the '
    'early-stopping best with restore_best_weights, else the last). '
    'predict: top-5 classes of --images. attention: cross-attention maps of '
    '--num_images test images, written to --output. check_data: decode every '
    'record of the splits --config uses and list those that do not decode. '
    'import: write the workdir of the checkpoint at --source.')
flags.DEFINE_string(
    'source', None, '--mode=import: a HuggingFace checkpoint folder '
    '(config.json with model.safetensors or pytorch_model.bin) of a '
    'Perceiver IO image classifier, or DeepMind\'s haiku .pystate file of '
    'one. --config, if given, is the config '
    'whose data and recipe fields the workdir keeps (default '
    'configs/imagenet_perceiver_io.py).')
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


class _QuietLibraries(std_logging.Filter):
  """Hides orbax's per-save INFO chatter; its warnings still show.

  Also hides orbax's reports of a full disk (a traceback from each of its
  writer threads): the run ends with one paragraph that names the path and
  how to resume (`loop.train_and_evaluate`).
  """

  def filter(self, record):
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    # pylint: disable-next=g-import-not-at-top
    from perceiver_jax.training import workdir as workdir_lib
    error = record.exc_info[1] if record.exc_info else None
    return (workdir_lib.out_of_space_path(error) is None and
            workdir_lib.out_of_space_path(
                RuntimeError(record.getMessage())) is None)


def _run_tool(workdir, argv):
  """--mode=eval, predict or attention, on the workdir's saved config."""
  # pylint: disable=g-import-not-at-top
  from perceiver_jax.tools import attention_maps
  from perceiver_jax.tools import evaluate
  from perceiver_jax.tools import predict
  # pylint: enable=g-import-not-at-top
  overrides = {} if FLAGS.config is None else dict(
      config_flags.get_override_values(FLAGS['config']))
  if FLAGS.mode == 'eval':
    evaluate.run(workdir, overrides=overrides)
  elif FLAGS.mode == 'predict':
    predict.run(workdir, list(FLAGS.images) + list(argv[1:]),
                overrides=overrides)
  else:
    attention_maps.run(workdir, num_images=FLAGS.num_images,
                       output=FLAGS.output, num_latents=FLAGS.num_latents,
                       iteration=FLAGS.attention_iteration,
                       overrides=overrides)


def _exit_with_paragraph(error):
  """Bad input or a diverged run: one clear paragraph, no traceback
  (`--verbosity=1` logs it). Anything else is a bug: its traceback shows."""
  logging.debug('Details:', exc_info=True)
  sys.exit(f'Error: {error}')


def _check_data():
  """--mode=check_data: jax devices untouched, status 1 on a bad record."""
  # pylint: disable=g-import-not-at-top
  from perceiver_jax.tools import check_data
  # pylint: enable=g-import-not-at-top
  try:
    good = check_data.run(FLAGS.config)
  except errors.InputError as e:
    _exit_with_paragraph(e)
  if not good:
    sys.exit(1)


def _run_import(workdir):
  """--mode=import: the checkpoint at --source as a workdir."""
  # pylint: disable=g-import-not-at-top
  from configs import imagenet_perceiver_io
  from perceiver_jax.convert import importer
  # pylint: enable=g-import-not-at-top
  base = FLAGS.config or imagenet_perceiver_io.get_config()
  importer.import_checkpoint(FLAGS.source, workdir, base)


def _config_file():
  """The --config file's path (any `:argument` suffix removed), or None."""
  if FLAGS.config is None:
    return None
  return config_flags.get_config_filename(FLAGS['config']).split(':', 1)[0]


def _check_config_file():
  """One line, not ml_collections' traceback, for a mistyped --config."""
  path = _config_file()
  if path is None or os.path.isfile(path):
    return
  root = os.path.dirname(CONFIGS_DIR)
  known = sorted(os.path.relpath(os.path.join(CONFIGS_DIR, name), root)
                 for name in os.listdir(CONFIGS_DIR)
                 if name.endswith('.py') and not name.startswith('_'))
  sys.exit(f'Error: --config={path}: no such file. The configs are: '
           f'{", ".join(known)}.')


def _workdir():
  """--workdir, or runs/<config name> under the current directory."""
  if FLAGS.workdir:
    return FLAGS.workdir
  path = _config_file()
  if path is None:
    sys.exit(f'Error: --mode={FLAGS.mode} needs --workdir=DIR, the workdir '
             'of a training run (or the --config it was trained with).')
  workdir = os.path.join(RUNS_DIR, os.path.splitext(os.path.basename(path))[0])
  logging.info('No --workdir given: writing to %s.', os.path.abspath(workdir))
  return workdir


def main(argv):
  if len(argv) > 1 and FLAGS.mode != 'predict':
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _check_config_file()
  if FLAGS.mode in ('train', 'check_data') and FLAGS.config is None:
    raise app.UsageError(f'--config is required for --mode={FLAGS.mode}, '
                         'e.g. --config=configs/cifar100.py.')
  if FLAGS.mode == 'import' and not (FLAGS.source and FLAGS.workdir):
    raise app.UsageError('--mode=import needs --source=CHECKPOINT_FOLDER and '
                         '--workdir=DIR (a new one).')
  if FLAGS.mode == 'check_data':
    _check_data()
    return
  workdir = _workdir()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before the JAX backend starts its threads.
  if host_memory.configure(FLAGS.host_memory):
    logging.info('Host memory: freed memory is kept for reuse '
                 '(--host_memory=system to turn off).')
  # Imported only now, so `--help` and flag errors need no jax/tensorflow.
  # pylint: disable=g-import-not-at-top
  from perceiver_jax.training import loop
  from perceiver_jax.training import metrics
  from perceiver_jax.training import preemption
  from perceiver_jax.training import sharding
  # pylint: enable=g-import-not-at-top
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes,
              FLAGS.process_id)
  if FLAGS.distributed or any(v is not None for v in explicit):
    sharding.initialize_distributed(*explicit)
  try:
    if FLAGS.mode == 'train':
      loop.train_and_evaluate(FLAGS.config, workdir)
    elif FLAGS.mode == 'import':
      _run_import(workdir)
    else:
      _run_tool(workdir, argv)
  except preemption.Preempted as e:
    logging.warning('%s', e)
    sys.exit(preemption.EXIT_CODE)
  except (errors.InputError, metrics.NonFiniteError) as e:
    _exit_with_paragraph(e)


if __name__ == '__main__':
  app.run(main)
