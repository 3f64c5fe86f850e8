r"""Training throughput and MFU of the jitted, sharded train step.

  python benchmarks/throughput.py --config=configs/cifar100.py --steps=20
  python benchmarks/throughput.py --config=configs/cifar100.py \
      --config.batch_size=16 --steps=7

Times `steps.jit_steps`' train step (the one `main.py` trains with: on-device
augmentation, LAMB, donated state) on synthetic uint8 CIFAR-shaped batches
that already sit on the devices, so the number is the step alone: compilation
and `--warmup` steps are excluded and the median of `--steps` timed steps is
reported. The last line is machine-readable:

  images_per_sec=<float> mfu=<float>

Model FLOPs are counted analytically (`analytic_flops_per_example`: every
matmul of the forward pass, x3 for forward + backward), the usual MFU
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

from perceiver_jax import folded as folded_lib
from perceiver_jax import host_memory
from perceiver_jax import model as model_lib
from perceiver_jax import sharding as sharding_lib
from perceiver_jax import steps as steps_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
# CIFAR's raw images; the step resizes them to config.image_size.
RAW_IMAGE_SIZE = 32
CHANNELS = 3
# Synthetic normalisation statistics (roughly CIFAR's); they change no cost.
STATS = {'mean': np.full(CHANNELS, 120.0),
         'variance': np.full(CHANNELS, 4000.0)}


def _define_flags():
  """Defined only when run as a script, so tests can import this module."""
  config_flags.DEFINE_config_file(
      'config', None, 'Path to a config file, e.g. configs/cifar100.py.',
      lock_config=True)
  flags.DEFINE_enum('mode', 'train_step', ['train_step', 'host_pipeline'],
                    'What to time.')
  flags.DEFINE_integer('steps', 20, 'Timed steps; the median is reported.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps run after compilation.')
  flags.DEFINE_integer('num_classes', 100, 'Width of the logits.')
  flags.DEFINE_integer(
      'peak_matmul_size', 0, 'Side of the square matmul timed for the peak; '
      '0 picks 2048 on CPU and 8192 on accelerators.')
  flags.DEFINE_enum('host_memory', 'auto', host_memory.MODES,
                    'As main.py: retain freed host memory (auto: unless a '
                    'GPU/TPU plugin is installed) or use the system '
                    "allocator's defaults.")
  flags.mark_flags_as_required(['config'])


# --------------------------------------------------------------------------
# FLOPs.


def _dense_chain_flops(rows, widths):
  """Matmul FLOPs of Dense layers widths[0] -> widths[1] -> ... on `rows`."""
  return sum(2 * rows * a * b for a, b in zip(widths[:-1], widths[1:]))


def transformer_attention_folded(config, batch_size=None):
  """Whether the latent self-attention runs in the folded form.

  Mirrors `attention.MultiHeadAttention.folded` for the seed's latent
  Transformer (queries, keys and values all latents of projection_dim).
  """
  form = config.get('attention_form', 'auto')
  if form != 'auto':
    return form == 'folded'
  d, n = config.projection_dim, config.latent_dim
  batch_size = config.batch_size if batch_size is None else batch_size
  return folded_lib.saves_flops(batch_size, n, n, d, d, d, config.num_heads,
                                d)


def analytic_flops_per_example(config, num_classes, channels=CHANNELS,
                               batch_size=None):
  """Matmul FLOPs of one example's forward pass, by part (2 per multiply-add).

  Counts what dominates and what MFU conventionally counts: the patch
  projection, q/k/v projections, attention logits and weighted sums, output
  projections, FFNs and the classifier. Everything elementwise (LayerNorm,
  GELU, softmax, dropout, residuals, the augmentation) is left out.

  The cross-attention's keys and values are projections of the same data
  array by the same (shared) weights in every iteration, so they are counted
  once: XLA computes them once too (common subexpression elimination), even
  though the seed's code asks for them per iteration.

  The latent self-attention is counted in the form it runs in
  (`config.attention_form`, 'auto' deciding at `batch_size`): the matmuls
  the device executes, so MFU is not flattered by the folded form. The
  folded form's per-head weight products (`W_q W_k^T`, `W_v W_o`) are paid
  once per step and appear spread over the batch ('weight_folding'). The
  factored (Keras-order) count is returned as 'factored_total' either way.

  Args:
    config: a model config (see configs/cifar100.py).
    num_classes: logits width.
    channels: image channels.
    batch_size: the batch the step runs (default config.batch_size).

  Returns:
    dict of FLOPs per part, with the sum under 'total'.
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  d = config.projection_dim
  n = config.latent_dim
  m = (config.image_size // config.patch_size)**2
  heads = config.num_heads
  head_dim = d  # Keras MultiHeadAttention(key_dim=projection_dim).
  ffn = (d,) + tuple(config.ffn_units)
  factored_block = (3 * 2 * n * d * heads * head_dim +   # q, k, v
                    2 * (2 * heads * n * n * head_dim) +  # logits, sums
                    2 * n * heads * head_dim * d +        # output projection
                    _dense_chain_flops(n, ffn))
  folded_block = (2 * n * d * heads * d +    # x W_qk
                  2 * (2 * heads * n * n * d) +  # logits, P x
                  2 * n * heads * d * d +    # (P x) W_vo
                  _dense_chain_flops(n, ffn))
  folded = transformer_attention_folded(config, batch_size)
  weight_sets = {'all': 1, 'paper': min(config.num_iterations, 2),
                 'none': config.num_iterations}[
                     config.get('weight_sharing', 'all')]
  parts = {
      'patch_projection': 2 * m * config.patch_size**2 * channels * d,
      'data_key_value': 2 * (2 * m * d * d),
      # Per iteration: q from the latents, logits and the weighted sum of
      # values, the FFN on the latents.
      'cross_attention': (2 * n * d * d + 2 * (2 * n * m * d) +
                          _dense_chain_flops(n, ffn)),
      # Per block and iteration, in the form that runs.
      'transformer_block': folded_block if folded else factored_block,
      # Per block and iteration: W_q W_k^T and W_v W_o of every head. XLA
      # forms them once per step and weight set (iterations sharing weights
      # share them), but their gradient once per iteration; counted so that
      # 3x the forward is the step's total, spread over the examples.
      'weight_folding': (2 * 2 * heads * d * head_dim * d *
                         (weight_sets + 2 * config.num_iterations) /
                         (3 * batch_size * config.num_iterations)
                         if folded else 0),
      'classifier': _dense_chain_flops(
          1, (d,) + tuple(config.classifier_units) + (num_classes,)),
  }

  def total(block):
    return (parts['patch_projection'] + parts['data_key_value'] +
            config.num_iterations *
            (parts['cross_attention'] +
             config.num_transformer_blocks * block) +
            parts['classifier'])

  parts['total'] = total(parts['transformer_block'] + parts['weight_folding'])
  parts['factored_total'] = total(factored_block)
  return parts


def analytic_train_flops_per_step(config, num_classes, batch_size=None):
  """Forward + backward matmul FLOPs of one train step (3x the forward).

  The backward pass does two matmuls (input and weight gradients) per
  forward matmul. Rematerialisation's extra forward is deliberately not
  counted: MFU counts the model's FLOPs, not the ones a schedule adds.
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  return 3 * batch_size * analytic_flops_per_example(
      config, num_classes, batch_size=batch_size)['total']


def xla_flops(compiled, num_devices=1):
  """FLOPs XLA's cost analysis counts for a compiled program, all devices.

  An SPMD-partitioned executable is one device's program, so its count is
  multiplied by the number of devices it runs on.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0]
  return float(cost['flops']) * num_devices


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
  matmul(a, b).block_until_ready()  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / min(times)


def peak_memory_bytes(device):
  """Peak bytes the device allocator has seen, or None where not tracked."""
  stats = device.memory_stats()
  if not stats:
    return None
  return stats.get('peak_bytes_in_use')


def compiled_memory_bytes(compiled):
  """XLA's static estimate of one device's memory for a compiled program."""
  try:
    m = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes +
          m.temp_size_in_bytes - m.alias_size_in_bytes)


def synthetic_batch(mesh, batch_size, num_classes, seed=0):
  """A global batch of random uint8 images and labels placed on `mesh`."""
  local = batch_size // jax.process_count()
  rng = np.random.default_rng(seed + jax.process_index())
  batch = {
      'image': rng.integers(0, 256, (local, RAW_IMAGE_SIZE, RAW_IMAGE_SIZE,
                                     CHANNELS), dtype=np.uint8),
      'label': rng.integers(0, num_classes, (local,), dtype=np.int32),
  }
  return sharding_lib.global_batch(mesh, batch)


def _gib(num_bytes):
  return 'n/a' if num_bytes is None else f'{num_bytes / 2**30:.2f} GiB'


# --------------------------------------------------------------------------
# Modes.


def benchmark_train_step(config, *, num_classes=100, steps=20, warmup=2,
                         peak_matmul_size=0, log=print):
  """Times the train step; returns a dict of results (see the module doc)."""
  if steps < 1 or warmup < 0:
    raise ValueError(f'Need steps >= 1 and warmup >= 0, got {steps}, '
                     f'{warmup}.')
  mesh = sharding_lib.create_mesh()
  sharding_lib.check_batch_size(config.batch_size, mesh)
  devices = list(mesh.devices.flat)
  device = devices[0]
  model = model_lib.create_model(config, num_classes)
  image_shape = (config.image_size, config.image_size, CHANNELS)
  state, shardings = steps_lib.create_train_state(config, model, image_shape,
                                                  mesh)
  train_step, _ = steps_lib.jit_steps(config, STATS, mesh, shardings)
  batch = synthetic_batch(mesh, config.batch_size, num_classes)
  lr = float(config.learning_rate)

  start = time.perf_counter()
  compiled = train_step.lower(state, batch, lr).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = compiled(state, batch, lr)
  jax.block_until_ready(state)
  times, cpu_times = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch, lr)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  loss = float(metrics['loss']) / float(metrics['count'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'Non-finite training loss {loss}.')

  step_s = statistics.median(times)
  images_per_sec = config.batch_size / step_s
  model_flops = analytic_train_flops_per_step(config, num_classes)
  factored_flops = 3 * config.batch_size * analytic_flops_per_example(
      config, num_classes)['factored_total']
  folded = transformer_attention_folded(config)
  compiled_flops = xla_flops(compiled, len(devices))
  achieved = model_flops / step_s
  dtype = jnp.dtype(config.get('dtype', 'float32'))
  size = peak_matmul_size or (2048 if device.platform == 'cpu' else 8192)
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
      compiled_memory_bytes=compiled_memory_bytes(compiled))

  log(f'devices: {len(devices)} x {device.device_kind} ({device.platform}), '
      f'{jax.process_count()} process(es); XLA_FLAGS='
      f'{os.environ.get("XLA_FLAGS", "")!r}')
  log(f'config: batch {config.batch_size}, dtype {dtype.name}, '
      f'attention_impl {config.get("attention_impl", "xla")}, '
      f'attention_form {config.get("attention_form", "auto")}, dropout_rng '
      f'{config.get("dropout_rng", "hash")}, remat '
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
  from perceiver_jax import augment
  from perceiver_jax import input_pipeline
  # pylint: enable=g-import-not-at-top
  pipeline = input_pipeline.Pipeline(config, num_shards=1, shard_indices=[0])
  cores = len(os.sched_getaffinity(0))
  spe = pipeline.steps_per_epoch
  stats = pipeline.normalization_stats()

  def batches():
    i = 0
    while True:
      yield pipeline.train_batch(i // spe, i % spe)
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
      f'{RAW_IMAGE_SIZE}->{config.image_size} px')
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
    benchmark_train_step(FLAGS.config, num_classes=FLAGS.num_classes,
                         steps=FLAGS.steps, warmup=FLAGS.warmup,
                         peak_matmul_size=FLAGS.peak_matmul_size)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
