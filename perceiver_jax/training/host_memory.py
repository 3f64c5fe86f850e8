"""Keep freed host memory for reuse, so CPU steps do not fault in fresh pages.

XLA:CPU allocates a step's temporary buffers (gigabytes for the seed's model
at batch 16) with malloc and frees them when the step ends. glibc serves
requests above 32 MiB with fresh pages from mmap and gives them back on free,
and worker threads allocate from their own heaps, which it trims or unmaps
as they empty. So every step touches every page anew: the kernel maps and
zeroes about 650,000 pages per step of the seed's model at batch 16, 1.2 to
1.4 s of kernel time, a sixth of the step's CPU time on a 2-core CPU.

`retain_freed_memory` sets glibc's malloc, through `mallopt`, to use a
single heap, never mmap and never trim, so the pages of one step serve the
next. The process then holds on to its peak host memory. It must run before
the JAX backend starts its threads; `configure` decides from the `mode`
('auto' retains only where no GPU or TPU plugin is installed, since an
accelerator's host does not run the step and its input pipeline threads are
better off with separate heaps). It needs no jax import, so benchmarks of
other frameworks can apply it the same way.
"""

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys

MODES = ('auto', 'retain', 'system')

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _glibc():
  """The process's glibc, or None (another libc, or not Linux)."""
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    return libc
  except (OSError, AttributeError):
    return None


def retain_freed_memory():
  """Makes glibc malloc keep freed memory; returns False where it cannot."""
  libc = _glibc()
  if libc is None:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def accelerator_plugin_installed():
  """True if a JAX GPU/TPU plugin (or libtpu) is installed.

  Checked without starting a JAX backend, as jax finds plugins: modules of
  the `jax_plugins` namespace package and 'jax_plugins' entry points.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return any(p.strip() not in ('', 'cpu') for p in platforms.split(','))
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def configure(mode):
  """Applies `mode` ('auto', 'retain' or 'system'); True if memory is retained.

  Call before the first JAX computation.
  """
  if mode not in MODES:
    raise ValueError(f'host memory mode must be one of {MODES}, got '
                     f'{mode!r}.')
  if mode == 'system' or (mode == 'auto' and accelerator_plugin_installed()):
    return False
  retained = retain_freed_memory()
  if not retained:
    logging.info('Host memory: this libc cannot be told to keep freed '
                 'memory; using its defaults.')
  return retained
