"""Which storage serves the batches: in host memory, or streamed from disk.

One interface (`input_pipeline.Pipeline`), two storages: `memory.py` decodes
the dataset once and keeps it (fastest while it fits: CIFAR's 184 MB),
`streaming.py` reads records from ArrayRecord files in worker
processes as batches are needed (host memory independent of dataset size:
ImageNet). Both serve the same examples in the same order (`sampler.py`);
for fixed-size images they decode them identically too.

`data_storage='auto'` keeps data in memory when its images have one size,
are used whole (`host_crop='none'`) and all three splits decoded take at
most `MEMORY_BUDGET_BYTES` (every process holds them all: an epoch's
batches draw from the whole training split); otherwise it streams. Pure
Python.

`data_workers=-1` counts the CPUs this process may use, not the machine's:
its CPU affinity, capped by the CPU quota of its cgroup (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`), which is what a container's
`--cpus` sets. A 240-vCPU host running a 16-CPU container gets 15 workers.
"""

import math
import os

from perceiver_jax import checks
from perceiver_jax import config_lib

STORAGES = ('auto', 'memory', 'stream')
MEMORY_BUDGET_BYTES = 4 * 2**30

# The storage options, as the config takes them.
RULES = {
    'data_storage': checks.one_of(*STORAGES),
    'data_workers': checks.Rule(
        lambda v: checks.is_int(v) and v >= -1,
        'an integer >= -1 (-1: one per usable CPU but one; 0: read in the '
        'training process)', -1),
    'normalization_examples': checks.non_negative_int(
        '0: the whole training split', example=10000),
}
OPTION_DEFAULTS = {'data_storage': 'auto', 'data_workers': -1,
                   'normalization_examples': 0}


def problems(values, field=str):
  """What is wrong across the storage options, as messages."""
  if values.get('host_crop') != 'inception':
    return []
  if values.get('data_storage') == 'memory':
    return [f'{field("data_storage")}=\'memory\' cannot serve '
            f'{field("host_crop")}=\'inception\' (its random crops change '
            "every epoch); pass --config.data_storage=stream (or auto)"]
  if values.get('mock_data'):
    return [f'{field("mock_data")}=True serves whole images from memory, '
            f'so it cannot take {field("host_crop")}=\'inception\'; pass '
            '--config.host_crop=none']
  return []


def choose(config, info, num_examples, host_crop):
  """'memory' or 'stream' for `config.data_storage` (see the module doc).

  Args:
    config: the run's config.
    info: the `datasets.DatasetInfo`.
    num_examples: examples of the three splits together.
    host_crop: the `host_transforms` crop in use.
  """
  kind = config_lib.option(config, 'data_storage')
  if config.mock_data:
    return 'memory'  # tfds' mock serves tf.data only.
  if kind != 'auto':
    return kind
  size = num_examples * info.height * info.width * info.channels
  fits = (not info.variable_size and host_crop == 'none'
          and size <= MEMORY_BUDGET_BYTES)
  return 'memory' if fits else 'stream'


def cpu_limit(affinity, quotas=()):
  """CPUs a process may keep busy: `affinity` (its CPU set's size), capped
  by each cgroup quota `(quota, period)` (microseconds; a quota of 1.5 CPUs
  counts as 2). Unlimited quotas (None, or <= 0) cap nothing."""
  caps = [math.ceil(q / p) for q, p in quotas if q and q > 0 and p > 0]
  return max(1, min([int(affinity)] + caps))


def _read(path):
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def _with_ancestors(mount, path):
  """`mount`/`path` and each directory above it up to `mount`."""
  parts = [p for p in path.split('/') if p and p != '..']
  return [os.path.join(mount, *parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_quotas(root='/sys/fs/cgroup', membership='/proc/self/cgroup'):
  """`[(quota, period)]` of the CPU limits on this process's cgroups.

  Read along its cgroup's path (from `membership`) and every ancestor, in
  the v2 hierarchy (`cpu.max`: "max 100000" or "200000 100000") and the v1
  `cpu` controller (`cpu.cfs_quota_us`, -1 for none, `cpu.cfs_period_us`).
  Inside a container the path may not exist under `root`; the mount's top
  (the container's own cgroup) is read then.
  """
  quotas = []
  for line in (_read(membership) or '').splitlines():
    _, controllers, path = (line.split(':', 2) + ['', ''])[:3]
    if not controllers:  # cgroup v2
      for directory in _with_ancestors(root, path):
        fields = (_read(os.path.join(directory, 'cpu.max')) or '').split()
        if len(fields) == 2 and fields[0] != 'max':
          quotas.append((int(fields[0]), int(fields[1])))
    elif 'cpu' in controllers.split(','):
      for mount in {os.path.join(root, controllers), os.path.join(root, 'cpu')}:
        for directory in _with_ancestors(mount, path):
          quota = _read(os.path.join(directory, 'cpu.cfs_quota_us'))
          period = _read(os.path.join(directory, 'cpu.cfs_period_us'))
          if quota and period:
            quotas.append((int(quota), int(period)))
  return quotas


def usable_cpus():
  """The CPUs this process may use (see the module doc)."""
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:  # No affinity call on this platform (macOS).
    affinity = os.cpu_count() or 1
  return cpu_limit(affinity, cgroup_quotas())


def num_workers(config, cpus=None):
  """Worker processes for streaming (`data_workers`; -1: one per usable
  CPU but one, `cpus` if given, else `usable_cpus()`)."""
  workers = config_lib.option(config, 'data_workers')
  if workers != -1:
    return workers
  return max(1, (usable_cpus() if cpus is None else cpus) - 1)
