"""A pool of worker processes that load what the main process asks for.

The streaming storage (`streaming.py`) and the data check
(`tools/check_data.py`) hand their per-batch work to one `Pool` for their
whole life: training, every validation pass, the test and the statistics
are served by the same `num_workers` processes.

* Order. The caller asks for one key at a time and says which keys it
  expects next (`Pool.get(key, upcoming)`); up to `depth` of those are in
  flight. Any idle worker takes the next task, and results are handed out in
  the order asked, whatever order they finish in. A key other than the one
  read ahead cancels the read-ahead (queued tasks are skipped, finished ones
  freed) and starts again from it.
* Transport. A result's large arrays go to one file in the buffer directory
  (`/dev/shm`, memory, where it exists): the worker writes them once, the
  main process maps the file and unlinks it at once, and the arrays it
  returns are views of that mapping, freed when the last view goes.
  `buffer_bytes` is the most the directory holds at once.
* Exit. Workers are spawned, not forked (the main process runs jax's
  threads); they import this module, numpy and what the loader's pickle
  names, never jax. `close()` stops them, as does the main process's exit;
  a worker also exits by itself within `PARENT_POLL_S` of the main process
  dying, even by SIGKILL, and removes the files nobody mapped. SIGTERM and
  SIGINT do not stop them: the main process decides.
* Errors. An exception in `loader(key)` is raised by `get` in the main
  process as itself (an `InputError` keeps its one paragraph), with the
  worker's traceback as its cause.
"""

import atexit
import collections
import dataclasses
import errno
import glob
import itertools
import math
import mmap
import multiprocessing
import multiprocessing.util
import os
import pickle
import queue
import signal
import tempfile
import threading
import time
import traceback
import weakref

import numpy as np

from perceiver_jax import errors

PARENT_POLL_S = 0.5
RESULTS_PER_WORKER = 2  # In flight per worker: one being loaded, one ready.
HELD_RESULTS = 2  # Returned results the caller may still hold.
_INLINE_BYTES = 1 << 16  # Smaller arrays travel pickled, with the message.
_ALIGN = 64
_POLL_S = 1.0  # How often a waiting `get` checks that the workers live.
_STOP_S = 10.0  # How long `close` waits before killing a worker.
_pool_ids = itertools.count()
_open_pools = weakref.WeakSet()


@atexit.register
def _close_open_pools():
  """Closes pools left open at exit. Registered after `multiprocessing.util`
  is imported, so it runs before multiprocessing's own exit handler, which
  would SIGTERM (ignored by the workers) and then wait for them."""
  for pool in list(_open_pools):
    pool.close()


def buffer_dir():
  """Where results wait: `/dev/shm` (memory) where it exists, else the temp
  directory (a disk's page cache)."""
  shm = '/dev/shm'
  if os.path.isdir(shm) and os.access(shm, os.W_OK):
    return shm
  return tempfile.gettempdir()


def free_bytes(directory):
  """Bytes an unprivileged process may still write in `directory`."""
  stat = os.statvfs(directory)
  return stat.f_bavail * stat.f_frsize


def buffer_bytes(num_workers, result_bytes):
  """The most buffer space `num_workers` workers use for results of
  `result_bytes` each: those in flight and those the caller holds."""
  return (RESULTS_PER_WORKER * num_workers + HELD_RESULTS) * result_bytes


@dataclasses.dataclass(frozen=True)
class _Stored:
  """A result whose large arrays wait in the file `path`."""
  path: str
  size: int
  layout: tuple  # (key, dtype, shape, offset) of each array in the file
  rest: dict  # The result's other entries.
  keys: tuple  # Every key, in the result's order.


def _store(value, path):
  """`value`, with a dict's large arrays moved to the file `path`."""
  if not isinstance(value, dict):
    return value
  big = {k: np.ascontiguousarray(v) for k, v in value.items()
         if isinstance(v, np.ndarray) and v.nbytes >= _INLINE_BYTES}
  if not big:
    return value
  layout, offset = [], 0
  for k, v in big.items():
    layout.append((k, v.dtype.str, v.shape, offset))
    offset += -(-v.nbytes // _ALIGN) * _ALIGN
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
  try:
    for (k, _, _, start) in layout:
      data = memoryview(big[k]).cast('B')
      while data:
        written = os.pwrite(fd, data, start)
        data, start = data[written:], start + written
  except OSError as e:
    os.unlink(path)
    if e.errno != errno.ENOSPC:
      raise
    raise errors.InputError(
        f'{os.path.dirname(path)} is full: a worker could not write a '
        f'result of {offset / 2**20:.1f} MiB there. Give it more room (a '
        'container: `docker run --shm-size=...`), or use fewer data workers '
        'or a smaller batch.') from None
  finally:
    os.close(fd)
  rest = {k: v for k, v in value.items() if k not in big}
  return _Stored(path, offset, tuple(layout), rest, tuple(value))


def _load(stored):
  """The result `_store` made: arrays are views of the mapped file, which
  is unlinked here (its memory is freed with the last view)."""
  if not isinstance(stored, _Stored):
    return stored
  fd = os.open(stored.path, os.O_RDWR)
  try:
    mapped = mmap.mmap(fd, stored.size)
  finally:
    os.close(fd)
    os.unlink(stored.path)
  arrays = {k: np.frombuffer(mapped, dtype, math.prod(shape),
                             offset).reshape(shape)
            for k, dtype, shape, offset in stored.layout}
  return {k: arrays[k] if k in arrays else stored.rest[k]
          for k in stored.keys}


def _discard(stored):
  if isinstance(stored, _Stored):
    try:
      os.unlink(stored.path)
    except FileNotFoundError:
      pass


def _remove_files(prefix):
  for path in glob.glob(glob.escape(prefix) + '*'):
    try:
      os.unlink(path)
    except OSError:
      pass


class _RemoteTraceback(Exception):
  """The traceback of an exception raised in a worker, as text."""

  def __str__(self):
    return self.args[0]


class _Failure:
  """An exception in a worker, as it travels to the main process."""

  def __init__(self, error):
    self.trace = ''.join(traceback.format_exception(error))
    try:
      pickle.loads(pickle.dumps(error))  # Both ways, or the caller fails.
      self.error = error
    except Exception:  # pylint: disable=broad-except
      self.error = RuntimeError(f'{type(error).__name__}: {error}')

  def throw(self):
    raise self.error from _RemoteTraceback(self.trace)


def _exit_with_parent(parent, prefix):
  """Ends this worker soon after the main process ends, however it ends
  (SIGKILL and the out-of-memory killer leave it no chance to say so)."""

  def watch():
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_S)
    _remove_files(prefix)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


def _serve(loader_blob, tasks, results, generation, prefix):
  """A worker's life: load each task's key and hand the result back.

  The main process decides when its workers stop (`close`, its exit, its
  death): a SIGTERM or Ctrl-C sent to the whole process group (a preempted
  VM, a terminal) must not end them while it finishes a step and saves.
  """
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  _exit_with_parent(os.getppid(), prefix)
  loader = pickle.loads(loader_blob)
  for task_generation, seq, key in iter(tasks.get, None):
    if task_generation != generation.value:
      continue  # Cancelled while queued.
    try:
      message = (task_generation, seq,
                 _store(loader(key), f'{prefix}{seq}'), None)
    except Exception as e:  # pylint: disable=broad-except
      message = (task_generation, seq, None, _Failure(e))
    results.put(message)


def _shutdown(workers, tasks, results, generation, prefix):
  """Stops the workers, frees what they left; safe to call twice."""
  if not workers:
    return
  generation.value += 1  # Skip whatever is still queued.
  for _ in workers:
    tasks.put(None)
  deadline = time.monotonic() + _STOP_S
  while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
    try:  # A worker exits only once its results are in the pipe.
      _discard(results.get(timeout=0.05)[2])
    except queue.Empty:
      pass
  for worker in workers:
    if worker.is_alive():
      worker.kill()
    worker.join()
  while True:
    try:
      _discard(results.get_nowait()[2])
    except (queue.Empty, OSError, ValueError):
      break
  for q in (tasks, results):
    q.close()
    q.cancel_join_thread()
  _remove_files(prefix)
  workers.clear()


class Pool:
  """`num_workers` processes that run `loader(key)` (see the module doc).

  Args:
    loader: a picklable callable; each worker unpickles one copy.
    num_workers: worker processes (at least 1), started on first use.
    depth: results in flight at most; default `RESULTS_PER_WORKER` per
      worker.
  """

  def __init__(self, loader, num_workers, depth=None):
    if num_workers < 1:
      raise ValueError(f'num_workers={num_workers} must be at least 1.')
    self._loader = loader
    self.num_workers = num_workers
    self._depth = depth or RESULTS_PER_WORKER * num_workers
    self.directory = buffer_dir()
    self._prefix = os.path.join(
        self.directory, f'perceiver_jax-{os.getpid()}-{next(_pool_ids)}-')
    self._workers = []
    self._ahead = collections.deque()  # (key, seq) in flight, in order.
    self._upcoming = iter(())
    self._done = {}  # seq -> (stored, failure) arrived before it was asked.
    self._seq = itertools.count()
    self._close = lambda: None

  def _start(self):
    context = multiprocessing.get_context('spawn')
    self._tasks, self._results = context.Queue(), context.Queue()
    self._generation = context.Value('q', 0, lock=False)
    blob = pickle.dumps(self._loader)
    for i in range(self.num_workers):
      worker = context.Process(
          target=_serve, name=f'data worker {i}', daemon=True,
          args=(blob, self._tasks, self._results, self._generation,
                self._prefix))
      worker.start()
      self._workers.append(worker)
    self._close = weakref.finalize(
        self, _shutdown, self._workers, self._tasks, self._results,
        self._generation, self._prefix)
    _open_pools.add(self)

  def get(self, key, upcoming=tuple):
    """`loader(key)`, from a worker; `upcoming()` gives the keys expected
    after `key`, loaded ahead while they are (called only when `key` was
    not the one expected)."""
    if not self._workers:
      self._start()
    if self._ahead and self._ahead[0][0] == key:
      _, seq = self._ahead.popleft()
    else:
      self._cancel()
      self._upcoming = iter(upcoming())
      seq = self._submit(key)
    while len(self._ahead) + 1 < self._depth:
      following = next(self._upcoming, None)
      if following is None:
        break
      self._ahead.append((following, self._submit(following)))
    while seq not in self._done:
      self._receive()
    stored, failure = self._done.pop(seq)
    if failure is not None:
      failure.throw()
    return _load(stored)

  def map(self, keys):
    """`loader(key)` of each of `keys`, in order, loaded ahead."""
    keys = list(keys)
    for i, key in enumerate(keys):
      yield self.get(key, lambda i=i: keys[i + 1:])

  def _submit(self, key):
    seq = next(self._seq)
    self._tasks.put((self._generation.value, seq, key))
    return seq

  def _receive(self):
    try:
      generation, seq, stored, failure = self._results.get(timeout=_POLL_S)
    except queue.Empty:
      for worker in self._workers:
        if worker.exitcode is not None:
          raise RuntimeError(
              f'Data worker process {worker.pid} ended unexpectedly (exit '
              f'code {worker.exitcode}; negative: killed by that signal, '
              'e.g. -9 by the out-of-memory killer). Its own error, if it '
              'had one, is printed above.')
      return
    if generation != self._generation.value:
      _discard(stored)  # Cancelled.
    else:
      self._done[seq] = (stored, failure)

  def _cancel(self):
    self._generation.value += 1
    self._ahead.clear()
    for stored, _ in self._done.values():
      _discard(stored)
    self._done.clear()

  def close(self):
    """Stops the workers and removes every result file they left."""
    self._ahead.clear()
    self._done.clear()
    self._close()
    _open_pools.discard(self)
