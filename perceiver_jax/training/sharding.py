"""Device mesh, named sharding rules and global batches.

Data parallelism over a one-axis mesh `('data',)` spanning every device of
every process. Parameters are placed by named rules, big_vision style: a list
of `(regex, partition spec)` matched against each parameter's path, first
match wins, unmatched leaves replicated. Today's default replicates
everything; an FSDP layout is a rule such as `('.*kernel', (None, 'data'))`.
"""

import re

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from perceiver_jax import checks
from perceiver_jax import errors

DATA_AXIS = 'data'
# The global batch, split over every device (see `check_batch_size`).
RULES = {'batch_size': checks.positive_int(example=64)}


def create_mesh(devices=None):
  """One-axis mesh over all global devices, ordered by process.

  Ordering by process keeps each process's devices contiguous, so a
  process's rows of the global batch are one contiguous slice.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_shard_indices(mesh):
  """Mesh positions of this process's devices (the data shards it reads)."""
  me = jax.process_index()
  return [i for i, d in enumerate(mesh.devices.flat) if d.process_index == me]


def check_batch_size(batch_size, mesh, field='batch_size', micro_batches=1):
  """Fails with a clear message unless the batch splits evenly over devices.

  With `micro_batches` K > 1 (`config.grad_accum_steps`) each of the K
  micro-batches must split evenly too: a multiple of K x the device count.
  """
  n = mesh.devices.size
  if batch_size > 0 and batch_size % (n * micro_batches) == 0:
    return
  if micro_batches == 1:
    raise errors.InputError(
        f'config.{field}={batch_size} must be a positive multiple of the '
        f'number of devices ({n}) so every device gets the same share; use '
        f'--config.{field}={max(n, (max(batch_size, 1) // n) * n)} or another '
        f'multiple of {n}.')
  unit = n * micro_batches
  fits = [k for k in range(1, micro_batches)
          if batch_size > 0 and batch_size % (n * k) == 0]
  other = (f', or --config.grad_accum_steps={fits[-1]} to keep this batch'
           if fits else '')
  raise errors.InputError(
      f'config.{field}={batch_size} must be a positive multiple of '
      f'config.grad_accum_steps ({micro_batches}) x the number of devices '
      f'({n}) = {unit}, so every micro-batch splits evenly over the devices; '
      f'use --config.{field}={max(unit, (max(batch_size, 1) // unit) * unit)}'
      f' or another multiple of {unit}{other}.')


def data_sharding(mesh):
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
  return NamedSharding(mesh, P())


def path_name(path):
  """'a/b/c' for a pytree key path (dict keys or attribute names)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def tree_shardings(tree, mesh, rules=()):
  """NamedShardings for every leaf of `tree` from `(regex, spec)` rules."""
  compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]

  def leaf_sharding(path, leaf):
    name = path_name(path)
    for pattern, spec in compiled:
      if pattern.fullmatch(name):
        if len(spec) > np.ndim(leaf):
          raise ValueError(f'Sharding rule {pattern.pattern!r} gives spec '
                           f'{spec} to {name} of rank {np.ndim(leaf)}.')
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def global_batch(mesh, local_batch):
  """Assembles per-process host batches into global arrays split on 'data'."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def initialize_distributed(coordinator_address=None, num_processes=None,
                           process_id=None):
  """Joins the processes of a multi-host run; call before any other JAX use.

  On a Cloud TPU slice (or a cluster JAX can detect) no argument is needed.
  GPU and CPU hosts pass the coordinator's `host:port`, the number of
  processes and this process's index. CPU processes exchange data via gloo.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes,
                                  process_id=process_id).items()
            if v is not None}
  jax.distributed.initialize(**kwargs)
