r"""Training throughput and MFU of the jitted, sharded train step.

  python benchmarks/throughput.py --config=configs/cifar100.py --steps=20
  python benchmarks/throughput.py --config=configs/cifar100.py \
      --config.batch_size=16 --steps=7

Times `steps.jit_steps`' train step (the one `main.py` trains with: on-device
augmentation, LAMB, donated state; built by `train_program.build`) on
synthetic uint8 batches of the config's own data shape (its dataset's
classes and served image size, `cases.data_shape`) that already sit on the
devices, so the number is the step alone: compilation and `--warmup` steps
are excluded and the median of `--steps` timed steps is reported.
`--config=PATH:ARG` picks a config's variant, as for main.py. The last line
is machine-readable:

  images_per_sec=<float> mfu=<float>

Model FLOPs are counted analytically (`flops.analytic_flops_per_example`:
every matmul of the forward pass, x3 for forward + backward), the usual MFU
convention; XLA's cost analysis of the compiled step is printed beside it as
a check (it also counts elementwise ops, softmax, LayerNorm, the optimizer,
the augmentation and any rematerialised forward pass). MFU divides the
achieved model FLOP/s by the dense matmul peak measured in the same run on
the same device in the config's compute dtype.

`--mode=host_pipeline` instead measures the host input pipeline alone
(`input_pipeline.Pipeline` batches, then the seed's augmentation run by XLA
on the host CPU), in images/s and images/s per CPU core:

  python benchmarks/throughput.py --config=configs/cifar100.py \
      --mode=host_pipeline --config.mock_data=True \
      --config.mock_num_examples=2048

Importing this module (and the train-step mode) needs no tensorflow, which
the GPU machines lack; only the host-pipeline mode imports it.
"""

import functools
import os
import statistics
import sys
import time

# Run as a script from anywhere: make the repository root importable (for
# `perceiver_jax` and for config files that import `configs`).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from benchmarks import cases
from benchmarks import flops
from benchmarks import memory
from benchmarks import timing
from benchmarks import train_program
from perceiver_jax.training import host_memory
from perceiver_jax.training import steps as steps_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def _define_flags():
  """Defined only when run as a script, so tests can import this module."""
  config_flags.DEFINE_config_file(
      'config', None, 'Path to a config file, e.g. configs/cifar100.py.',
      lock_config=True)
  flags.DEFINE_enum('mode', 'train_step', ['train_step', 'host_pipeline'],
                    'What to time.')
  flags.DEFINE_integer('steps', 20, 'Timed steps; the median is reported.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps run after compilation.')
  flags.DEFINE_integer(
      'peak_matmul_size', 0, 'Side of the square matmul timed for the peak; '
      '0 picks 2048 on CPU and 8192 on accelerators.')
  flags.DEFINE_enum('host_memory', 'auto', host_memory.MODES,
                    'As main.py: retain freed host memory (auto: unless a '
                    'GPU/TPU plugin is installed) or use the system '
                    "allocator's defaults.")
  flags.mark_flags_as_required(['config'])


# --------------------------------------------------------------------------
# Peak, memory, data.


def measure_matmul_peak(dtype, size, device, repeats=5):
  """Dense matmul FLOP/s of `device` in `dtype`: best of `repeats` calls.

  Uses the default matmul precision, as the model's Dense layers do (so on
  GPUs a float32 peak is TF32's when XLA picks it).
  """
  a, b = jax.random.normal(jax.random.key(0), (2, size, size), jnp.float32)
  a, b = jax.device_put((a.astype(dtype), b.astype(dtype)), device)
  matmul = jax.jit(jnp.matmul)
  return timing.matmul_peak(lambda: matmul(a, b).block_until_ready(), size,
                            repeats)


def default_peak_size(device):
  """Side of the peak's square matmul: 2048 on CPU, 8192 on accelerators."""
  return 2048 if device.platform == 'cpu' else 8192


def measure_copy_bandwidth(device, num_bytes=2**30, repeats=5):
  """Memory bytes/s of `device`: `x + 1` over a float32 array, best of 5.

  Each call reads and writes `num_bytes` (2 x `num_bytes` counted), as a
  streaming elementwise fusion does; the roofline's bandwidth term.
  """
  x = jax.device_put(jnp.zeros(num_bytes // 4, jnp.float32), device)
  add = jax.jit(lambda v: v + 1)

  def call():
    add(x).block_until_ready()

  call()  # Compile and warm up.
  return 2 * num_bytes / timing.best_seconds(call, repeats)


def peak_memory_bytes(device):
  """Peak bytes the device allocator has seen, or None where not tracked."""
  stats = device.memory_stats()
  if not stats:
    return None
  return stats.get('peak_bytes_in_use')


def _gib(num_bytes):
  return 'n/a' if num_bytes is None else f'{num_bytes / 2**30:.2f} GiB'


def time_steps(step, state, batch, learning_rate, steps, warmup):
  """Runs `warmup` untimed, then `steps` timed calls of `step`, each waited for.

  Returns:
    `(state, metrics, times, cpu_times)`: the last call's outputs and each
    timed call's wall and process CPU seconds.
  """
  metrics = None
  for _ in range(warmup):
    state, metrics = step(state, batch, learning_rate)
  jax.block_until_ready(state)
  times, cpu_times = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = step(state, batch, learning_rate)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  return state, metrics, times, cpu_times


# --------------------------------------------------------------------------
# Modes.


def benchmark_train_step(config, *, steps=20, warmup=2, peak_matmul_size=0,
                         log=print):
  """Times the train step; returns a dict of results (see the module doc)."""
  if steps < 1 or warmup < 0:
    raise ValueError(f'Need steps >= 1 and warmup >= 0, got {steps}, '
                     f'{warmup}.')
  step = train_program.build(config)
  num_classes = step.num_classes
  devices = list(step.mesh.devices.flat)
  device = devices[0]
  batch = train_program.synthetic_batch(step)
  lr = float(config.learning_rate)
  compiled, compile_s = train_program.compile_step(step, batch=batch)
  state, metrics, times, cpu_times = time_steps(compiled, step.state, batch,
                                                lr, steps, warmup)
  loss = float(metrics['loss']) / float(metrics['count'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'Non-finite training loss {loss}.')

  step_s = statistics.median(times)
  images_per_sec = config.batch_size / step_s
  per_example = flops.analytic_flops_per_example(config, num_classes)
  model_flops = 3 * config.batch_size * per_example['total']
  factored_flops = 3 * config.batch_size * per_example['factored_total']
  folded = step.model.latent_attention_folded(config.batch_size)
  compiled_flops = flops.xla_cost(compiled, len(devices))['flops']
  achieved = model_flops / step_s
  dtype = jnp.dtype(config.get('dtype', 'float32'))
  size = peak_matmul_size or default_peak_size(device)
  peak = measure_matmul_peak(dtype, size, device) * len(devices)
  mfu = achieved / peak
  results = dict(
      images_per_sec=images_per_sec, step_s=step_s, step_min_s=min(times),
      step_max_s=max(times), step_cpu_s=statistics.median(cpu_times),
      compile_s=compile_s, loss=loss,
      model_flops_per_step=model_flops, xla_flops_per_step=compiled_flops,
      factored_flops_per_step=factored_flops, folded=folded,
      achieved_flops=achieved, peak_flops=peak, mfu=mfu,
      peak_memory_bytes=peak_memory_bytes(device),
      compiled_memory_bytes=memory.compiled_memory_bytes(compiled))

  log(f'devices: {len(devices)} x {device.device_kind} ({device.platform}), '
      f'{jax.process_count()} process(es); XLA_FLAGS='
      f'{os.environ.get("XLA_FLAGS", "")!r}')
  log(f'config: batch {config.batch_size}, dtype {dtype.name}, data '
      f'{step.raw_size}x{step.raw_size} px, {num_classes} classes, '
      f'attention_impl {config.get("attention_impl", "xla")}, '
      f'attention_form {config.get("attention_form", "auto")}, dropout_bits '
      f'{config.get("dropout_bits", "hash")}, remat '
      f'{config.get("remat", False)}, image {config.image_size}, patch '
      f'{config.patch_size}, latents {config.latent_dim}x'
      f'{config.projection_dim}, {config.num_transformer_blocks} blocks x '
      f'{config.num_iterations} iterations')
  log(f'compile: {compile_s:.1f} s; warm-up steps: {warmup}; loss after '
      f'the last step: {loss:.4f}')
  log(f'step time: median {step_s * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, '
      f'max {max(times) * 1e3:.1f}) over {steps} steps')
  log(f'process CPU time per step: median {results["step_cpu_s"]:.2f} s '
      '(all threads; on a shared CPU it moves less than the wall time)')
  log(f'images/s: {images_per_sec:.1f}')
  log(f'model FLOPs/step (analytic matmuls, fwd+bwd = 3x fwd): '
      f'{model_flops / 1e9:.2f} GFLOP, latent self-attention '
      f'{"folded" if folded else "factored"} (in Keras\' factored order: '
      f'{factored_flops / 1e9:.2f} GFLOP)')
  log(f'XLA cost-analysis FLOPs/step: {compiled_flops / 1e9:.2f} GFLOP '
      f'(XLA / analytic = {compiled_flops / model_flops:.3f})')
  log(f'achieved: {achieved / 1e12:.4f} TFLOP/s (analytic FLOPs)')
  log(f'dense matmul peak ({dtype.name}, {size}^3, best of 5, x '
      f'{len(devices)} devices): {peak / 1e12:.4f} TFLOP/s')
  log(f'MFU: {mfu:.4f}')
  log(f'peak device memory: {_gib(results["peak_memory_bytes"])} '
      f'(XLA estimate for the step: '
      f'{_gib(results["compiled_memory_bytes"])})')
  log(f'images_per_sec={images_per_sec:.3f} mfu={mfu:.5f}')
  return results


def benchmark_host_pipeline(config, *, steps=20, warmup=2, log=print):
  """Host-side batches and host-side augmentation, per CPU core.

  Training augments on the device, so the host only gathers uint8 rows; the
  second number says what the host would sustain if it also augmented (as
  the Keras example's CPU-side tf.data pipelines would).
  """
  # Imported here: it imports tensorflow, which the GPU machines lack.
  # pylint: disable=g-import-not-at-top
  from perceiver_jax.data import augment
  from perceiver_jax.data import input_pipeline
  # pylint: enable=g-import-not-at-top
  pipeline = input_pipeline.Pipeline(config, num_shards=1, shard_indices=[0])
  cores = len(os.sched_getaffinity(0))
  spe = pipeline.steps_per_epoch
  stats = pipeline.normalization_stats()

  served = []  # The side of the images the host serves.

  def batches():
    i = 0
    while True:
      batch = pipeline.train_batch(i // spe, i % spe)
      served[:] = [batch['image'].shape[1]]
      yield batch
      i += 1

  source = batches()
  for _ in range(warmup):
    next(source)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    next(source)
    times.append(time.perf_counter() - start)
  gather = config.batch_size / statistics.median(times)

  cpu = jax.devices('cpu')[0]
  augment_fn = jax.jit(functools.partial(
      augment.preprocess_train, mean=jnp.asarray(stats['mean'], jnp.float32),
      variance=jnp.asarray(stats['variance'], jnp.float32),
      image_size=config.image_size))
  times = []
  with jax.default_device(cpu):
    for i in range(warmup + steps):
      start = time.perf_counter()
      images = jax.device_put(next(source)['image'], cpu)
      rng = steps_lib.step_rngs(config.seed, i)[0]
      augment_fn(rng, images).block_until_ready()
      if i >= warmup:
        times.append(time.perf_counter() - start)
  augmented = config.batch_size / statistics.median(times)
  log(f'host: {cores} CPU cores available; batch {config.batch_size}, '
      f'{served[0]}->{config.image_size} px')
  log(f'batches (uint8 gather): {gather:.0f} images/s, '
      f'{gather / cores:.0f} per core')
  log(f'batches + augmentation on the host CPU: {augmented:.0f} images/s, '
      f'{augmented / cores:.0f} per core')
  log(f'host_images_per_sec={augmented:.3f} '
      f'host_images_per_sec_per_core={augmented / cores:.3f}')
  return dict(gather_images_per_sec=gather, images_per_sec=augmented,
              images_per_sec_per_core=augmented / cores, cores=cores)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  retained = host_memory.configure(FLAGS.host_memory)
  print(f'host memory: {"retained" if retained else "system defaults"}')
  if FLAGS.mode == 'host_pipeline':
    benchmark_host_pipeline(FLAGS.config, steps=FLAGS.steps,
                            warmup=FLAGS.warmup)
  else:
    benchmark_train_step(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                         peak_matmul_size=FLAGS.peak_matmul_size)


if __name__ == '__main__':
  _define_flags()
  app.run(cases.input_errors_as_paragraphs(main))
