"""Timing shared by the benchmarks: the best of repeated, blocking calls.

Imports neither jax nor tensorflow, so the JAX and the Keras benchmarks
time the same way.
"""

import time


def best_seconds(call, repeats=5):
  """Wall time of the fastest of `repeats` calls; `call` must block."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return min(times)


def matmul_peak(call, size, repeats=5):
  """FLOP/s of a `size`^3 matmul computed by `call`, after one warm-up call."""
  call()  # Compile and warm up.
  return 2 * size**3 / best_seconds(call, repeats)
