"""What a benchmark runs: a config, its variant, batch and dtype, and its data.

Every benchmark names what it compiles in one spelling,

  CONFIG[:ARG][@BATCH][+DTYPE]

CONFIG a file under configs/ without `.py` (`imagenet_perceiver`) or a path
to one (`configs/imagenet_perceiver.py`); ARG what main.py's
`--config=PATH:ARG` passes to `get_config` (the config's variant, e.g.
`imagenet_perceiver_io:fourier`); BATCH the global batch and DTYPE the
compute dtype, each the config's own when left out. E.g.
`imagenet_perceiver_io:fourier@1024+bfloat16`.

The data a case's step is fed, the dataset's classes and the side of its
images as the host serves them, comes from `data_shape`, so a benchmark
times the program the config trains. Imports neither jax nor tensorflow.
"""

import dataclasses
import importlib.util
import os
from typing import Optional

from perceiver_jax import errors

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The compute dtypes a case may ask for (config.dtype).
DTYPES = ('float32', 'bfloat16', 'float16')
SPELLING = 'CONFIG[:ARG][@BATCH][+DTYPE]'
# Classes, and the side of the images as the host serves them, of the
# datasets the configs name; images that vary in size are served at
# config.image_size (the host crops or resizes them).
DATASETS = {'cifar10': (10, 32), 'cifar100': (100, 32),
            'imagenet2012': (1000, None)}


@dataclasses.dataclass(frozen=True)
class Case:
  """One parsed `CONFIG[:ARG][@BATCH][+DTYPE]` (see the module docstring).

  Attributes:
    spec: as written; the benchmarks' tables name cases by it.
    path: the config file.
    arg: `get_config`'s argument, or None.
    batch: the global batch, or None for the config's own.
    dtype: the compute dtype, or None for the config's own.
  """
  spec: str
  path: str
  arg: Optional[str] = None
  batch: Optional[int] = None
  dtype: Optional[str] = None

  @property
  def name(self):
    """The config file's name without `.py` (`imagenet_perceiver_io`)."""
    return os.path.splitext(os.path.basename(self.path))[0]

  @property
  def label(self):
    """The config's name and variant (`imagenet_perceiver_io:fourier`)."""
    return self.name + (f':{self.arg}' if self.arg else '')

  def exists(self):
    return os.path.exists(self.path)

  def config(self):
    """The config the case names, its batch and dtype applied."""
    if not self.exists():
      raise errors.InputError(
          f'Benchmark case {self.spec!r}: no config file {self.path}. CONFIG '
          'is a file under configs/ without .py (e.g. imagenet_perceiver) or '
          'the path of one.')
    config = load_config(self.path, self.arg)
    return variant(config, **{name: value for name, value in (
        ('batch_size', self.batch), ('dtype', self.dtype))
                              if value is not None})


def parse_case(spec):
  """The `Case` of `CONFIG[:ARG][@BATCH][+DTYPE]`; InputError if malformed."""
  def refuse(why):
    raise errors.InputError(
        f'Benchmark case {spec!r}: {why}. A case is {SPELLING}, e.g. '
        "'imagenet_perceiver_io:fourier@1024+bfloat16' or "
        "'configs/cifar100.py@64'.")

  rest, _, dtype = spec.partition('+')
  if '+' in spec and dtype not in DTYPES:
    refuse(f'DTYPE must be one of {", ".join(DTYPES)}, got {dtype!r}')
  rest, _, batch = rest.partition('@')
  if '@' in spec and not (batch.isdigit() and int(batch) > 0):
    refuse(f'BATCH must be a positive integer, got {batch!r}')
  name, _, arg = rest.partition(':')
  if not name:
    refuse('it names no config')
  if ':' in arg:
    refuse(f'ARG {arg!r} holds a colon (the older CONFIG:DTYPE:BATCH '
           'spelling is now CONFIG@BATCH+DTYPE)')
  path = name if name.endswith('.py') else os.path.join(
      _ROOT, 'configs', name + '.py')
  path = (os.path.abspath(path) if os.path.exists(path) else
          os.path.join(_ROOT, path))  # Else relative to the repository root.
  return Case(spec, path, arg or None, int(batch) if batch else None,
              dtype or None)


def config_module(path):
  """The config file's module, imported from its path."""
  spec = importlib.util.spec_from_file_location(
      'config_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path, arg=None):
  """`get_config([arg])` of a config file (imports `configs` from the root).

  `arg` is what main.py's `--config=PATH:ARG` passes (e.g. 'test').
  """
  module = config_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def variant(config, **fields):
  """A resolved copy of `config` with `fields` set."""
  config = config.copy_and_resolve_references()
  for name, value in fields.items():
    config[name] = value
  return config


def data_shape(config):
  """`(num_classes, side of the served images)` of the config's dataset."""
  classes, side = DATASETS.get(config.get('dataset', 'cifar100'),
                               (1000, None))
  return classes, side or config.image_size


def input_errors_as_paragraphs(main):
  """`main`, printing a bad case or config as main.py does: one paragraph,
  no traceback, exit status 1. Any other error keeps its traceback."""

  def run(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except errors.InputError as e:
      raise SystemExit(f'Error: {e}') from None

  return run
