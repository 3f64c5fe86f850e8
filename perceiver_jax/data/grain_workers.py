"""grain's worker processes: how they start, what they hold, how they end.

The streaming storage (`streaming.py`) and the data check
(`tools/check_data.py`) read through grain's multiprocessing prefetch
(`open_iterator`: `MapDataset.to_iter_dataset().mp_prefetch(...)`): worker i
of n computes elements i, i + n, ... of the dataset and grain hands them
back in the dataset's order.

* jax. Workers are spawned processes; grain imports jax, so they do too, but
  nothing they run asks for a device: they never initialise a jax backend
  or `jax.distributed` (tests/data/test_streaming.py checks this in a worker
  that served training, evaluation and statistics).
* Exit (`worker_init`). A worker waits for the main process to take its next
  element, so if that process is killed outright (SIGKILL, the out-of-memory
  killer) nothing would stop it: each worker exits by itself within
  `PARENT_POLL_S` of losing its parent (multiprocessing's resource tracker
  then frees the shared memory they leave). SIGTERM and SIGINT do not stop
  workers: a signal to the whole process group (a preempted VM, Ctrl-C)
  must leave them to the training process, which finishes its step and
  saves first. `close` stops them; iterators still open at exit are closed
  before multiprocessing's own exit handler, which would SIGTERM them (in
  vain) and wait.
* Shared memory. grain copies each element's numpy arrays into POSIX shared
  memory (`/dev/shm`); `buffer_bytes` is the most a set of workers holds
  there. `close` waits until grain has freed what the main process let go,
  so a run that ends leaves nothing there.
* Errors. An exception in a worker is raised in the main process as itself,
  with the worker's frames, if it pickles (`records.BadRecordError` does).
"""

import atexit
import mmap
# Imported before `_close_at_exit` is registered: see there.
import multiprocessing.util  # pylint: disable=unused-import
import os
import signal
import threading
import time

from absl import flags
import grain
from grain._src.python.ipc import shared_memory_array

PARENT_POLL_S = 0.5
SHM_DIR = '/dev/shm'
BUFFER_PER_WORKER = 1  # grain's `per_worker_buffer_size`.
# Elements in shared memory per worker: its buffer and the one it waits to
# put there, and as many in the main process's prefetch thread for it.
IN_FLIGHT_PER_WORKER = 2 * BUFFER_PER_WORKER + 2
HELD = 2  # Elements the caller may hold: the one in use, the step's before.
_open = []  # Iterators not yet closed; `_close_at_exit` closes them.


@atexit.register
def _close_at_exit():
  """Registered after `multiprocessing.util` is imported, so it runs
  before multiprocessing's exit handler (see the module doc), which would
  also drop the frees grain has queued."""
  for iterator in list(_open):
    close(iterator)
  _free_synchronously()


def page_bytes(nbytes):
  """Shared memory taken by an array of `nbytes`: whole pages."""
  return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def buffer_bytes(num_workers, element_bytes):
  """The most shared memory `num_workers` workers hold for elements of
  `element_bytes` (each array's `page_bytes`, summed) at once."""
  return (IN_FLIGHT_PER_WORKER * num_workers + HELD) * element_bytes


def free_bytes(directory=SHM_DIR):
  """Bytes an unprivileged process may still write in `directory`; None
  where it does not exist (POSIX shared memory lives elsewhere there)."""
  if not os.path.isdir(directory):
    return None
  stat = os.statvfs(directory)
  return stat.f_bavail * stat.f_frsize


def worker_init(index, count):
  """grain's `worker_init_fn`: see "Exit" in the module doc."""
  del index, count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_S)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


def open_iterator(dataset: grain.MapDataset, num_workers):
  """An iterator over `dataset`'s elements in order, computed by
  `num_workers` processes (0: in this process, as it is asked)."""
  # grain reads its absl flags; outside `app.run` (tests, notebooks) they
  # are not parsed yet, so take their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  data = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0))
  if num_workers:
    data = data.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers,
                                     per_worker_buffer_size=BUFFER_PER_WORKER),
        worker_init_fn=worker_init)
  iterator = iter(data)
  _open.append(iterator)
  return iterator


def close(iterator):
  """Stops the iterator's workers; returns once grain has freed the shared
  memory of the elements nobody holds any more."""
  if iterator in _open:
    _open.remove(iterator)
  iterator.close()
  _wait_for_frees()


# grain frees an element's shared memory in a background thread (one, in
# order) once the element is garbage. It has no public call to wait for
# that: the two below use its private `SharedMemoryArray` pool; the version
# is pinned in requirements.txt, and tests/training/test_resilience.py
# checks that a streaming run leaves nothing behind.


def _wait_for_frees():
  """Returns once the frees queued so far are done: the pool's one thread
  runs them in order, so a no-op queued after them ends after them."""
  arrays = shared_memory_array.SharedMemoryArray
  pool = arrays._del_thread_pool  # pylint: disable=protected-access
  if pool is not None:
    pool.apply(int)


def _free_synchronously():
  """At exit: waits for the queued frees and has `__del__` free at once
  from now on (a pool's queue is dropped at exit). Not earlier: grain sets
  up the pool again when workers next start, racing with a `__del__` in
  another thread."""
  arrays = shared_memory_array.SharedMemoryArray
  pool = arrays._del_thread_pool  # pylint: disable=protected-access
  if pool is not None:
    arrays._disable_async_del()  # pylint: disable=protected-access
    pool.close()
    pool.join()
