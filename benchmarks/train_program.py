"""The train step `main.py` trains with, built for a benchmark.

The one way the benchmarks (throughput, step_bench and the device check,
roofline, memory) build what they compile: the config's model, its train
state (`steps.create_train_state` on the devices, or
`steps.abstract_train_state`: shapes only, nothing allocated),
`steps.jit_steps`' train step (on-device augmentation, the optimiser,
donated state), and a batch of the config's own data shape
(`cases.data_shape`: the dataset's classes and the side of its images as
the host serves them), as random uint8 images or as shapes alone. A step
lowers from shapes as well as from arrays, and compiles to the same
program. Imports neither tensorflow nor tfds.
"""

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases
from perceiver_jax import config_lib
from perceiver_jax.model import perceiver
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps as steps_lib

CHANNELS = 3
# Synthetic normalisation statistics (roughly CIFAR's); they change no cost.
STATS = {'mean': np.full(CHANNELS, 120.0),
         'variance': np.full(CHANNELS, 4000.0)}

Step = collections.namedtuple(
    'Step', 'config mesh model state shardings train_step num_classes '
    'raw_size')


def train_state(config, model, mesh, abstract=False):
  """`(state, shardings)` of `model`'s train state over `mesh`.

  `abstract`: the state's shapes and dtypes only (`jax.ShapeDtypeStruct`s).
  """
  make = (steps_lib.abstract_train_state if abstract
          else steps_lib.create_train_state)
  return make(config, model, (config.image_size, config.image_size,
                              CHANNELS), mesh)


def build(config, mesh=None, abstract=False):
  """The config's jitted train step over `mesh` (default: every device).

  Validates the config and the batch's split over the devices (and
  `grad_accum_steps`) first, as main.py does before anything compiles.

  Returns:
    `Step`: the config, mesh, model, initial train state (abstract with
    `abstract`) and its shardings, the jitted train step, and the data
    shape it is fed (`num_classes`, `raw_size`).
  """
  config_lib.validate(config)
  mesh = sharding_lib.create_mesh() if mesh is None else mesh
  sharding_lib.check_batch_size(
      config.batch_size, mesh,
      micro_batches=steps_lib.grad_accum_steps(config))
  num_classes, raw_size = cases.data_shape(config)
  model = perceiver.create_model(config, num_classes)
  state, shardings = train_state(config, model, mesh, abstract)
  train_step, _ = steps_lib.jit_steps(config, STATS, mesh, shardings)
  return Step(config, mesh, model, state, shardings, train_step, num_classes,
              raw_size)


def synthetic_batch(step, seed=0, abstract=False):
  """A global batch of `step`'s data shape, placed on its mesh.

  Random uint8 images (the served side: the step resizes them to
  `config.image_size`) and labels; with `abstract`, their
  `jax.ShapeDtypeStruct`s (the whole global batch, in this process).
  """
  size, side = step.config.batch_size, step.raw_size
  if abstract:
    rows = sharding_lib.data_sharding(step.mesh)
    return {'image': jax.ShapeDtypeStruct((size, side, side, CHANNELS),
                                          jnp.uint8, sharding=rows),
            'label': jax.ShapeDtypeStruct((size,), jnp.int32,
                                          sharding=rows)}
  local = size // jax.process_count()
  rng = np.random.default_rng(seed + jax.process_index())
  return sharding_lib.global_batch(step.mesh, {
      'image': rng.integers(0, 256, (local, side, side, CHANNELS),
                            dtype=np.uint8),
      'label': rng.integers(0, step.num_classes, (local,), dtype=np.int32)})


def lower(step, state=None, batch=None):
  """`step`'s train step lowered for its state and an abstract batch.

  `state` and `batch` (arrays or shapes) default to `step.state` and
  `synthetic_batch(step, abstract=True)`.
  """
  state = step.state if state is None else state
  batch = synthetic_batch(step, abstract=True) if batch is None else batch
  return step.train_step.lower(state, batch, float(step.config.learning_rate))


def compile_step(step, compiler_options=None, **lower_args):
  """`(compiled, seconds)`: `lower(step, **lower_args)`, compiled."""
  start = time.perf_counter()
  compiled = lower(step, **lower_args).compile(
      compiler_options=compiler_options)
  return compiled, time.perf_counter() - start
