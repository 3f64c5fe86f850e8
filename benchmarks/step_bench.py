"""Compiled train steps of several configs on one mesh, timed.

Used by device_check.py: programs with the same config compile once, each
lowered from abstract inputs (`train_program`); every case starts from its
architecture's initial train state (kept on the host, so donation cannot
consume it), and each timing reports what the device check's table lists
(images/s, MFU against the measured peak, XLA's cost and the roofline it
predicts, memory, epoch times). `batch_sweep` doubles the batch while that
pays.
"""

import concurrent.futures
import dataclasses
import gc
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops as flops_lib
from benchmarks import memory
from benchmarks import roofline
from benchmarks import throughput
from benchmarks import train_program
from perceiver_jax.model import compute as compute_lib
from perceiver_jax.training import sharding as sharding_lib

# One CIFAR-100 epoch of the seed: 90% of the 50,000 training images.
EPOCH_IMAGES = 45_000
# Epochs the Keras example trained before early stopping ended it.
EPOCHS = 45


def architecture(config):
  """What the train state depends on: the config without speed fields."""
  speed = (*compute_lib.OPTION_DEFAULTS, 'dtype', 'remat', 'batch_size',
           'learning_rate', 'dropout_rate', 'attention_dropout_rate')
  return json.dumps({k: v for k, v in config.to_dict().items()
                     if k not in speed}, sort_keys=True, default=str)


class Clock:
  """The run's deadline and each section's budget (PLAN)."""

  def __init__(self, max_minutes, log):
    self.start = time.perf_counter()
    self.end = self.start + 60 * max_minutes
    self.banked = 0.0
    self.deadline = self.end
    self.log = log

  def elapsed(self):
    return time.perf_counter() - self.start

  def begin(self, name, planned_min):
    now = time.perf_counter()
    self.section_start = now
    self.planned = 60 * planned_min
    self.deadline = min(self.end, now + self.planned + self.banked)
    self.log(f'== {name}: starts at {self.elapsed():.0f} s, budget '
             f'{self.deadline - now:.0f} s (planned {self.planned:.0f} s)')

  def finish(self, name):
    spent = time.perf_counter() - self.section_start
    self.banked = max(0.0, self.banked + self.planned - spent)
    self.deadline = self.end
    self.log(f'== {name}: {spent:.1f} s (run so far {self.elapsed():.0f} s)')
    return spent


@dataclasses.dataclass
class Program:
  """One config's train step, compiled for one batch.

  `step` is `train_program.build`'s, with the abstract state the program
  was lowered for: its static fields (the model's apply function and the
  optimiser) are the very objects every state passed to `compiled` must
  carry.
  """
  label: str
  config: object
  step: object = None
  lowered: object = None
  compiled: object = None
  compile_s: float = 0.0
  error: str = ''


class Bench:
  """The mesh, one initial train state per architecture, compiled programs.

  Programs with the same config share one compile. Every case starts from
  its architecture's initial state (kept on the host, so donation cannot
  consume it), with the case's own model and optimiser attached.
  """

  def __init__(self, compiler_options, threads, log):
    self.mesh = sharding_lib.create_mesh()
    self.devices = list(self.mesh.devices.flat)
    self.compiler_options = compiler_options
    self.threads = max(1, threads)
    self.log = log
    self._initial = {}
    self._programs = {}

  def initial_state(self, program):
    """A fresh train state on the devices, as `program`'s step expects.

    The first call for an architecture initialises it (and keeps it on the
    host); every call returns a copy with the program's model and
    optimiser attached.
    """
    step = program.step
    key = architecture(program.config)
    if key not in self._initial:
      state, _ = train_program.train_state(program.config, step.model,
                                           self.mesh)
      self._initial[key] = jax.device_get(state)
      del state
    static = dict(apply_fn=step.state.apply_fn, tx=step.state.tx)
    return jax.device_put(self._initial[key].replace(**static),
                          step.shardings)

  def batch(self, program, seed=0):
    return train_program.synthetic_batch(program.step, seed)

  def programs(self, specs, deadline=None):
    """Compiled `Program`s of `(label, config)`.

    Lowered here one after the other, from abstract inputs, compiled
    `threads` at a time. A program that fails to build, lower or compile
    carries its error; one not started before `deadline` (perf_counter
    seconds) carries 'skipped'.
    """
    out, todo = [], []
    for label, config in specs:
      key = json.dumps(config.to_dict(), sort_keys=True, default=str)
      if key not in self._programs:
        program = Program(label, config)
        try:
          program.step = train_program.build(config, self.mesh,
                                             abstract=True)
          program.lowered = train_program.lower(program.step)
          todo.append(program)
        except Exception as e:  # pylint: disable=broad-except
          program.error = short_error(e)
        self._programs[key] = program
      out.append(self._programs[key])

    def compile_one(program):
      if deadline is not None and time.perf_counter() > deadline:
        program.error = 'skipped: the section ran out of time'
        return
      start = time.perf_counter()
      try:
        program.compiled = program.lowered.compile(
            compiler_options=self.compiler_options)
        program.error = ''
      except Exception as e:  # pylint: disable=broad-except
        program.error = short_error(e)
      program.compile_s = time.perf_counter() - start
      self.log(f'  compiled {program.label} in {program.compile_s:.1f} s'
               + (f' ({program.error})' if program.error else ''))

    with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
      list(pool.map(compile_one, todo))
    # A compile that failed beside others gets one more try on its own.
    for program in todo:
      if program.compiled is None and self.threads > 1 and not (
          program.error.startswith('skipped')):
        compile_one(program)
      program.lowered = None
    return out


def short_error(error):
  text = f'{type(error).__name__}: {error}'.replace('\n', ' ')
  return text[:300]


def out_of_memory(error):
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def measure_peaks(bench, peak_size, bandwidth_bytes):
  """Matmul peaks per dtype (all devices) and one device's bandwidth."""
  device = bench.devices[0]
  size = peak_size or throughput.default_peak_size(device)
  peaks = {name: throughput.measure_matmul_peak(jnp.dtype(name), size,
                                                device) * len(bench.devices)
           for name in ('float32', 'bfloat16')}
  bandwidth = throughput.measure_copy_bandwidth(
      device, bandwidth_bytes) * len(bench.devices)
  return {'matmul_peak_flops': peaks, 'matmul_size': size,
          'bandwidth_bytes_per_s': bandwidth}


def time_program(bench, program, label, steps, warmup, peaks, bandwidth):
  """Times `program`; a dict of what the module docstring lists."""
  config, device = program.config, bench.devices[0]
  row = {'config': label, 'dtype': config.get('dtype', 'float32'),
         'batch': config.batch_size,
         'attention_impl': config.get('attention_impl', 'xla'),
         'compile_s': program.compile_s}
  if program.error:
    return dict(row, note=program.error)
  estimate = memory.compiled_memory_bytes(program.compiled)
  limit = (device.memory_stats() or {}).get('bytes_limit')
  row['xla_memory_bytes'] = estimate
  if estimate and limit and estimate > limit:
    return dict(row, note=f'does not fit: XLA estimate {estimate / 2**30:.1f}'
                f' GiB > device limit {limit / 2**30:.1f} GiB', oom=True)
  before = throughput.peak_memory_bytes(device)
  try:
    state = bench.initial_state(program)
    state, metrics, times, _ = throughput.time_steps(
        program.compiled, state, bench.batch(program),
        float(config.learning_rate), steps, warmup)
    loss = float(metrics['loss']) / float(metrics['count'])
    del state
  except Exception as e:  # pylint: disable=broad-except
    gc.collect()
    oom = out_of_memory(e)
    return dict(row, note='out of memory' if oom else short_error(e),
                oom=oom)
  step_s = statistics.median(times)
  model_flops = flops_lib.analytic_train_flops_per_step(
      config, program.step.num_classes)
  cost = flops_lib.xla_cost(program.compiled, len(bench.devices))
  peak = peaks[row['dtype'] if row['dtype'] in peaks else 'float32']
  predicted = roofline.predict(cost['flops'], cost['bytes'], peak, bandwidth)
  after = throughput.peak_memory_bytes(device)
  images_per_sec = config.batch_size / step_s
  row.update(
      images_per_sec=images_per_sec, step_ms=step_s * 1e3,
      step_min_ms=min(times) * 1e3, step_max_ms=max(times) * 1e3,
      loss=loss, model_flops=model_flops, mfu=model_flops / step_s / peak,
      xla_flops=cost['flops'], xla_bytes=cost['bytes'],
      roofline_ms=predicted['time_s'] * 1e3, roofline_bound=predicted['bound'],
      peak_memory_bytes=after,
      peak_memory_is_this_case=bool(after and (before is None or
                                               after > before)),
      epoch_s=EPOCH_IMAGES / images_per_sec,
      epochs_min=EPOCHS * EPOCH_IMAGES / images_per_sec / 60)
  if not math.isfinite(loss):
    row['note'] = f'non-finite loss {loss}'
  return row


def batch_sweep(first, last, wave_size, min_gain, run_wave, out_of_time):
  """Doubles the batch from `first` to at most `last`; marks the best row.

  Stops at a batch that does not fit or fails, at one less than `min_gain`
  faster (images/s) than the best so far, or when `out_of_time()` says so
  before a timing.

  Args:
    first: the first batch.
    last: the largest batch to try.
    wave_size: batches handed to `run_wave` at once (compiled together).
    min_gain: e.g. 0.05 for 5%.
    run_wave: batches -> iterator of their rows, timed as they are drawn.
    out_of_time: () -> bool.

  Returns:
    `(rows, best row or None, why the sweep ended)`; the best row (most
    images/s) gets `best=True`.
  """
  rows, best, batch, reason = [], None, first, None
  while batch <= last and reason is None:
    wave = [batch * 2**i for i in range(wave_size) if batch * 2**i <= last]
    timed = iter(run_wave(wave))
    for _ in wave:
      if out_of_time():
        reason = 'out of time'
        break
      row = next(timed)
      rows.append(row)
      rate = row.get('images_per_sec')
      if rate is None:
        reason = 'does not fit' if row.get('oom') else 'failed'
        break
      if best is not None and rate < (1 + min_gain) * best['images_per_sec']:
        row['note'] = (f'not {min_gain:.0%} faster than batch '
                       f"{best['batch']}")
        reason = 'no gain'
      if best is None or rate > best['images_per_sec']:
        best = row
      if reason:
        break
    batch = wave[-1] * 2
  if best is not None:
    best['best'] = True
  return rows, best, reason or 'largest batch (--sweep_max) reached'
