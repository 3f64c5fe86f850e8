r"""Host input pipeline: images/s per core, cores per accelerator, host memory.

  python benchmarks/host_pipeline.py --out=/tmp/host_pipeline

Generates ImageNet-like JPEGs (500 x 375, quality 90, by default) as a tfds
dataset in ArrayRecord files and measures:
  * the host transforms alone, in this process on one core: decode +
    Inception crop + flip (train) and decode + resize + centre crop (eval),
    images/s;
  * the streaming `Pipeline` with 1..N grain worker processes: images/s;
  * the cores one accelerator needs to feed the Perceiver paper's ImageNet
    model (configs/imagenet_perceiver.py), from its analytic FLOP count
    (benchmarks/flops.py), a peak and an assumed MFU (both flags: nothing
    here measures an accelerator);
  * the peak host memory (this process and its workers, max RSS) while
    streaming datasets of two sizes, the larger several times an
    illustrative in-memory budget, `--memory_budget_mib` (not the 4 GiB
    `storage.MEMORY_BUDGET_BYTES` that `data_storage='auto'` uses);
  * in-memory against streamed batches for CIFAR-sized data (32 x 32 PNGs),
    which `data_storage='auto'` keeps in memory.
The last line is machine-readable. `--smoke` runs tiny sizes in seconds.
"""

import importlib
import io
import os
import resource
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from benchmarks import flops
from configs import cifar100
from perceiver_jax.data import host_transforms
from perceiver_jax.data import input_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string('out', None, 'Directory for the results (markdown).')
  flags.DEFINE_string('data_dir', None, 'Where to write the generated '
                      'datasets; default a temporary directory.')
  flags.DEFINE_integer('num_images', 512, 'Generated JPEGs (the small set).')
  flags.DEFINE_integer('memory_factor', 4, 'The large set is this many '
                       'times the small one.')
  flags.DEFINE_integer('memory_budget_mib', 64, 'The in-memory budget the '
                       'large set (decoded) exceeds several times.')
  flags.DEFINE_integer('batch_size', 64, 'Local batch of the pipeline runs.')
  flags.DEFINE_integer('image_size', 224, 'Crop size.')
  flags.DEFINE_float('peak_tflops', 989.0, 'Dense bf16 peak of the '
                     'accelerator, TFLOP/s (H100 SXM, NVIDIA datasheet).')
  flags.DEFINE_float('mfu', 0.4, 'Assumed model FLOPs utilisation.')
  flags.DEFINE_bool('smoke', False, 'Tiny sizes, for the test suite.')
  flags.DEFINE_string('memory_probe', None, 'Internal: stream this '
                      'generated dataset once and print the peak RSS.')


class SyntheticJpegs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """`num` JPEGs of `width` x `height`, quality 90, natural-ish content.

  Smooth colour fields plus noise: JPEG spends about as many bits on them as
  on photographs (72-84 KB each at 500 x 375, BENCHMARKS.md), unlike flat
  or pure-noise images.
  """
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = []

  def __init__(self, *, num, width, height, fmt='JPEG', **kwargs):
    self._num, self._size, self._fmt = num, (width, height), fmt
    super().__init__(**kwargs)

  def _info(self):
    encoding = 'jpeg' if self._fmt == 'JPEG' else 'png'
    width, height = self._size
    shape = (None, None, 3) if encoding == 'jpeg' else (height, width, 3)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.
                                 FeaturesDict({
                                     'image': tfds.features.Image(
                                         shape=shape,
                                         encoding_format=encoding),
                                     'label': tfds.features.ClassLabel(
                                         num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(self._num, 0),
            'test': self._generate_examples(max(self._num // 10, 8), 1)}

  def _generate_examples(self, num, seed):
    width, height = self._size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    for i in range(num):
      phases = rng.uniform(0, 6, (3, 3))
      base = np.stack([np.sin(a * 9 * x + b * 9 * y + c)
                       for a, b, c in phases], -1)
      image = (base + 1) * 110 + rng.normal(0, 12, (height, width, 3))
      image = np.clip(image, 0, 255).astype(np.uint8)
      if self._fmt == 'JPEG':
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format='JPEG', quality=90)
        image = buffer.getvalue()
      yield str(i), {'image': image, 'label': i % 10}


def _prepare(data_dir, name, **kwargs):
  # Unregistered: the pipeline opens it from its files, as any prepared
  # dataset.
  builder = type(name, (SyntheticJpegs,), {}, skip_registration=True)(
      data_dir=data_dir, **kwargs)
  builder.download_and_prepare(file_format='array_record')
  return builder


def _config(name, data_dir, **overrides):
  config = cifar100.get_config()
  config.update(dict(dataset=name, tfds_data_dir=data_dir,
                     validation_split=0.1, num_epochs=1))
  config.update(overrides)
  return config


def _rate(count, seconds):
  return count / max(seconds, 1e-9)


def transform_rates(builder, image_size):
  """Train and eval transforms in this process, images/s on one core."""
  source = builder.as_data_source(
      split='train', decoders={'image': tfds.decode.SkipDecoding()})
  records = [source[i]['image'] for i in range(len(source))]
  transform = host_transforms.HostTransform('inception', image_size,
                                            image_size, 3)
  start = time.process_time()
  for i, data in enumerate(records):
    transform.train(data, 0, 0, i)
  train = _rate(len(records), time.process_time() - start)
  start = time.process_time()
  for data in records:
    transform.eval(data)
  return train, _rate(len(records), time.process_time() - start)


def pipeline_rate(config):
  """Training images/s of one epoch of the pipeline's batches."""
  with input_pipeline.Pipeline(config, num_shards=1,
                               shard_indices=[0]) as pipeline:
    batches = pipeline.train_batches(0, 0)
    next(batches)  # Workers started and warm.
    start, count = time.perf_counter(), 0
    for batch in batches:
      count += len(batch['label'])
    return _rate(count, time.perf_counter() - start), pipeline.storage


def peak_rss_mib():
  """Max resident MiB of this process and of its largest finished child."""
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return own / 1024, children / 1024


def run(data_dir, *, num_images, memory_factor, memory_budget_mib, batch_size,
        image_size, peak_tflops, mfu, probe_memory=True, log=print):
  """Every measurement of the module docstring; returns a dict of them."""
  cores = len(os.sched_getaffinity(0))
  small = _prepare(data_dir, 'bench_jpegs_small', num=num_images, width=500,
                   height=375)
  train, evaluate = transform_rates(small, image_size)
  log(f'host transforms, one core: train {train:.0f} images/s, eval '
      f'{evaluate:.0f} images/s ({num_images} JPEGs 500x375 q90, crop '
      f'{image_size})')
  results = dict(cores=cores, train_per_core=train, eval_per_core=evaluate)
  crop = dict(host_crop='inception', device_augment='none',
              image_size=image_size, batch_size=batch_size)
  for workers in sorted({1, max(1, cores - 1)}):
    rate, _ = pipeline_rate(_config(small.name, data_dir, data_workers=workers,
                                    **crop))
    results[f'pipeline_{workers}_workers'] = rate
    log(f'streaming pipeline, {workers} worker(s): {rate:.0f} images/s')
  model_config = importlib.import_module(
      'configs.imagenet_perceiver').get_config()
  per_image = 3 * flops.analytic_flops_per_example(model_config,
                                                   1000)['total']
  needed = peak_tflops * 1e12 * mfu / per_image
  results['images_per_sec_needed'] = needed
  results['cores_needed'] = needed / train
  log(f'configs/imagenet_perceiver.py: {per_image / 1e9:.0f} GFLOP per '
      f'training image (3 x the forward pass as it runs) -> {needed:.0f} '
      f'images/s at {mfu:.0%} of {peak_tflops:.0f} TFLOP/s (assumed) -> '
      f'{needed / train:.2f} cores at {train:.0f} train images/s per core')
  large = _prepare(data_dir, 'bench_jpegs_large',
                   num=num_images * memory_factor, width=500, height=375)
  decoded = large.info.splits['train'].num_examples * 500 * 375 * 3 / 2**20
  log(f'large set: {decoded:.0f} MiB decoded, '
      f'{decoded / memory_budget_mib:.1f}x a {memory_budget_mib} MiB '
      'in-memory budget')
  for builder in (small, large) if probe_memory else ():
    # In a fresh process, so its max RSS is this dataset's alone.
    probe = subprocess.run(
        [sys.executable, os.path.abspath(__file__),
         f'--memory_probe={builder.name}', f'--data_dir={data_dir}',
         f'--batch_size={batch_size}', f'--image_size={image_size}'],
        capture_output=True, text=True, check=True)
    own, workers = map(float, probe.stdout.split()[-2:])
    results[f'{builder.name}_rss_mib'] = (own, workers)
    log(f'{builder.name}: {builder.info.splits["train"].num_examples} '
        f'images streamed; peak RSS {own:.0f} MiB (training process) + '
        f'{workers:.0f} MiB (largest worker)')
  for kind, fmt, size in (('memory', 'PNG', 32), ('stream', 'PNG', 32)):
    builder = _prepare(data_dir, f'bench_cifar_{kind}', num=num_images * 8,
                       width=size, height=size, fmt=fmt)
    rate, storage = pipeline_rate(_config(
        builder.name, data_dir, data_storage=kind, data_workers=1,
        batch_size=batch_size))
    results[f'cifar_{storage}'] = rate
    log(f'CIFAR-sized 32x32 PNGs, {storage}: {rate:.0f} images/s')
  log(f'host_train_images_per_sec_per_core={train:.1f} '
      f'host_eval_images_per_sec_per_core={evaluate:.1f}')
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sizes = dict(num_images=FLAGS.num_images, memory_factor=FLAGS.memory_factor,
               batch_size=FLAGS.batch_size, image_size=FLAGS.image_size)
  if FLAGS.smoke:
    sizes = dict(num_images=16, memory_factor=2, batch_size=4, image_size=32)
  data_dir = FLAGS.data_dir or tempfile.mkdtemp(prefix='host_pipeline_')
  if FLAGS.memory_probe:
    pipeline_rate(_config(FLAGS.memory_probe, data_dir, data_workers=1,
                          host_crop='inception', device_augment='none',
                          image_size=sizes['image_size'],
                          batch_size=sizes['batch_size']))
    print(*peak_rss_mib())
    return
  lines = []

  def log(line):
    print(line, flush=True)
    lines.append(line)

  run(data_dir, memory_budget_mib=FLAGS.memory_budget_mib,
      peak_tflops=FLAGS.peak_tflops, mfu=FLAGS.mfu, log=log, **sizes)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, 'host_pipeline.md'), 'w') as f:
      f.write('\n'.join(f'- {line}' for line in lines) + '\n')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
