r"""The Keras example's own training step, timed like benchmarks/throughput.py.

  python benchmarks/keras_reference.py --config=configs/cifar100.py \
      --config.batch_size=16 --steps=7

Builds the seed's model with its own code (Keras 3, TensorFlow backend):
the augmentation (Normalization, Resizing, RandomFlip, RandomZoom) inside the
model, patches, cross-attention and Transformer modules with shared weights,
LAMB (`keras.optimizers.Lamb`, standing in for the seed's tfa LAMB), sparse
cross-entropy from logits, accuracy and top-5 metrics. Hyperparameters come
from the same config file as the JAX run, so both time the same model and
batch. It trains on synthetic CIFAR-shaped data already in memory: each
timed step is one `train_on_batch` call (which waits for its result);
compilation and `--warmup` steps are excluded and the median of `--steps`
is reported. The last line is machine-readable:

  images_per_sec=<float>

TensorFlow and Keras are not dependencies of the JAX training code; this
script is only for the comparison in BENCHMARKS.md.
"""

import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from benchmarks import timing
from perceiver_jax.training import host_memory
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
RAW_IMAGE_SIZE = 32
CHANNELS = 3


def _define_flags():
  """Defined only when run as a script, so tests can import this module."""
  config_flags.DEFINE_config_file(
      'config', None, 'Path to a config file, e.g. configs/cifar100.py.',
      lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Timed steps; the median is reported.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after the first (tracing) '
                       'step.')
  flags.DEFINE_integer('num_classes', 100, 'Width of the logits.')
  flags.DEFINE_integer('peak_matmul_size', 2048, 'Side of the square float32 '
                       'matmul timed for the peak.')
  flags.DEFINE_enum('jit_compile', 'auto', ['auto', 'true', 'false'],
                    "model.compile's jit_compile; 'auto' (Keras' default) is "
                    'False on CPU-only machines.')
  flags.DEFINE_enum('host_memory', 'system', host_memory.MODES,
                    "'system' runs the example as it ships; 'retain' sets "
                    "glibc's malloc as main.py does on CPU, to compare like "
                    'with like.')
  flags.mark_flags_as_required(['config'])


def build_seed_model(config, num_classes, mean=None, variance=None):
  """The Keras example's Perceiver, in its own code (comments trimmed).

  The only additions are layer names, so tests can copy weights across by
  name (tests/test_model.py), and leaving the augmentation out when no
  normalisation statistics are given.

  Args:
    config: model hyperparameters (see configs/cifar100.py).
    num_classes: logits width.
    mean: per-channel mean for the Normalization layer (the seed adapts it
      on x_train; a fixed value costs the same). None: no augmentation, the
      model maps already preprocessed `image_size` images to logits.
    variance: per-channel variance for the Normalization layer.

  Returns:
    An unbuilt `keras.Model`.
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  layers = keras.layers
  image_size = config.image_size
  num_patches = (image_size // config.patch_size)**2

  data_augmentation = None
  if mean is not None:
    data_augmentation = keras.Sequential(
        [
            layers.Normalization(mean=mean, variance=variance),
            layers.Resizing(image_size, image_size),
            layers.RandomFlip('horizontal'),
            layers.RandomZoom(height_factor=0.2, width_factor=0.2),
        ],
        name='data_augmentation',
    )
    # The seed builds Normalization eagerly by adapting it on x_train.
    data_augmentation.build((None, RAW_IMAGE_SIZE, RAW_IMAGE_SIZE, CHANNELS))

  def create_ffn(hidden_units, dropout_rate, name):
    ffn_layers = []
    for i, units in enumerate(hidden_units[:-1]):
      ffn_layers.append(layers.Dense(units, activation=tf.nn.gelu,
                                     name=f'{name}_dense_{i}'))
    ffn_layers.append(layers.Dense(
        units=hidden_units[-1], name=f'{name}_dense_{len(hidden_units) - 1}'))
    ffn_layers.append(layers.Dropout(dropout_rate))
    return keras.Sequential(ffn_layers, name=name)

  class Patches(layers.Layer):

    def __init__(self, patch_size):
      super().__init__()
      self.patch_size = patch_size

    def call(self, images):
      batch_size = tf.shape(images)[0]
      patches = tf.image.extract_patches(
          images=images, sizes=[1, self.patch_size, self.patch_size, 1],
          strides=[1, self.patch_size, self.patch_size, 1],
          rates=[1, 1, 1, 1], padding='VALID')
      patch_dims = patches.shape[-1]
      return tf.reshape(patches, [batch_size, -1, patch_dims])

  class PatchEncoder(layers.Layer):

    def __init__(self, num_patches, projection_dim):
      super().__init__()
      self.num_patches = num_patches
      self.projection = layers.Dense(units=projection_dim)
      self.position_embedding = layers.Embedding(
          input_dim=num_patches, output_dim=projection_dim)

    def call(self, patches):
      positions = tf.range(start=0, limit=self.num_patches, delta=1)
      return self.projection(patches) + self.position_embedding(positions)

  def create_cross_attention_module(latent_dim, data_dim, projection_dim,
                                    ffn_units, dropout_rate):
    inputs = {
        # Named so Keras 3 matches the dict keys (Keras 2 went by order).
        'latent_array': layers.Input(shape=(latent_dim, projection_dim),
                                     name='latent_array'),
        'data_array': layers.Input(shape=(data_dim, projection_dim),
                                   name='data_array'),
    }
    norm = lambda name: layers.LayerNormalization(epsilon=1e-6, name=name)
    latent_array = norm('latent_norm')(inputs['latent_array'])
    data_array = norm('data_norm')(inputs['data_array'])
    query = layers.Dense(units=projection_dim, name='query')(latent_array)
    key = layers.Dense(units=projection_dim, name='key')(data_array)
    value = layers.Dense(units=projection_dim, name='value')(data_array)
    attention_output = layers.Attention(
        use_scale=True, dropout=config.attention_dropout_rate,
        name='attention')([query, key, value], return_attention_scores=False)
    attention_output = layers.Add()([attention_output, latent_array])
    attention_output = norm('ffn_norm')(attention_output)
    ffn = create_ffn(ffn_units, dropout_rate, name='cross_ffn')
    outputs = ffn(attention_output)
    outputs = layers.Add()([outputs, attention_output])
    return keras.Model(inputs=inputs, outputs=outputs)

  def create_transformer_module(latent_dim, projection_dim, num_heads,
                                num_transformer_blocks, ffn_units,
                                dropout_rate):
    inputs = layers.Input(shape=(latent_dim, projection_dim))
    x0 = inputs
    for b in range(num_transformer_blocks):
      x1 = layers.LayerNormalization(
          epsilon=1e-6, name=f'block_{b}_attention_norm')(x0)
      attention_output = layers.MultiHeadAttention(
          num_heads=num_heads, key_dim=projection_dim,
          dropout=config.attention_dropout_rate,
          name=f'block_{b}_self_attention')(x1, x1)
      x2 = layers.Add()([attention_output, x0])
      x3 = layers.LayerNormalization(
          epsilon=1e-6, name=f'block_{b}_ffn_norm')(x2)
      ffn = create_ffn(ffn_units, dropout_rate, name=f'block_{b}_ffn')
      x3 = ffn(x3)
      x0 = layers.Add()([x3, x2])
    return keras.Model(inputs=inputs, outputs=x0)

  class Perceiver(keras.Model):
    """The seed's model class."""

    def __init__(self, patch_size, data_dim, latent_dim, projection_dim,
                 num_heads, num_transformer_blocks, ffn_units, dropout_rate,
                 num_iterations, classifier_units):
      super().__init__()
      self.latent_dim = latent_dim
      self.data_dim = data_dim
      self.patch_size = patch_size
      self.projection_dim = projection_dim
      self.num_heads = num_heads
      self.num_transformer_blocks = num_transformer_blocks
      self.ffn_units = ffn_units
      self.dropout_rate = dropout_rate
      self.num_iterations = num_iterations
      self.classifier_units = classifier_units

    def build(self, input_shape):
      self.latent_array = self.add_weight(
          shape=(self.latent_dim, self.projection_dim),
          initializer='random_normal', trainable=True)
      self.patcher = Patches(self.patch_size)
      self.patch_encoder = PatchEncoder(self.data_dim, self.projection_dim)
      self.cross_attention = create_cross_attention_module(
          self.latent_dim, self.data_dim, self.projection_dim,
          self.ffn_units, self.dropout_rate)
      self.transformer = create_transformer_module(
          self.latent_dim, self.projection_dim, self.num_heads,
          self.num_transformer_blocks, self.ffn_units, self.dropout_rate)
      self.global_average_pooling = layers.GlobalAveragePooling1D()
      self.classification_head = create_ffn(
          self.classifier_units, self.dropout_rate, name='classifier')
      super().build(input_shape)

    def call(self, inputs):
      if data_augmentation is not None:
        inputs = data_augmentation(inputs)
      patches = self.patcher(inputs)
      encoded_patches = self.patch_encoder(patches)
      cross_attention_inputs = {
          'latent_array': tf.expand_dims(self.latent_array, 0),
          'data_array': encoded_patches,
      }
      for _ in range(self.num_iterations):
        latent_array = self.cross_attention(cross_attention_inputs)
        latent_array = self.transformer(latent_array)
        cross_attention_inputs['latent_array'] = latent_array
      representation = self.global_average_pooling(latent_array)
      return self.classification_head(representation)

  return Perceiver(
      config.patch_size, num_patches, config.latent_dim,
      config.projection_dim, config.num_heads,
      config.num_transformer_blocks, list(config.ffn_units),
      config.dropout_rate, config.num_iterations,
      list(config.classifier_units) + [num_classes])


def compile_seed_model(model, config, jit_compile='auto'):
  """The seed's `model.compile`, with Keras 3's LAMB."""
  import keras  # pylint: disable=g-import-not-at-top
  model.compile(
      optimizer=keras.optimizers.Lamb(learning_rate=config.learning_rate,
                                      weight_decay=config.weight_decay),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=[
          keras.metrics.SparseCategoricalAccuracy(name='acc'),
          keras.metrics.SparseTopKCategoricalAccuracy(5, name='top5-acc'),
      ],
      jit_compile=jit_compile)
  return model


def measure_matmul_peak(size, repeats=5):
  """TensorFlow's float32 matmul FLOP/s, measured as throughput.py does."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  a = tf.random.normal((size, size))
  b = tf.random.normal((size, size))
  matmul = tf.function(tf.linalg.matmul)
  return timing.matmul_peak(lambda: matmul(a, b).numpy(), size, repeats)


def benchmark(config, *, num_classes=100, steps=20, warmup=2,
              jit_compile='auto', peak_matmul_size=2048, log=print):
  """Times the seed's train step; returns a dict of results."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(config.seed)
  rng = np.random.default_rng(0)
  x = tf.constant(rng.integers(
      0, 256, (config.batch_size, RAW_IMAGE_SIZE, RAW_IMAGE_SIZE, CHANNELS)
  ).astype(np.float32))
  y = tf.constant(rng.integers(0, num_classes, (config.batch_size, 1)))
  model = build_seed_model(config, num_classes, mean=[120.0] * CHANNELS,
                           variance=[4000.0] * CHANNELS)
  model = compile_seed_model(model, config, jit_compile)

  start = time.perf_counter()
  model.train_on_batch(x, y)  # Builds, traces and compiles.
  first_s = time.perf_counter() - start
  for _ in range(warmup):
    model.train_on_batch(x, y)
  times, cpu_times = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = model.train_on_batch(x, y)[0]
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  if not np.isfinite(loss):
    raise FloatingPointError(f'Non-finite training loss {loss}.')
  step_s = statistics.median(times)
  step_cpu_s = statistics.median(cpu_times)
  images_per_sec = config.batch_size / step_s
  peak = measure_matmul_peak(peak_matmul_size)
  log(f'keras {keras.__version__}, tensorflow {tf.__version__}, backend '
      f'{keras.backend.backend()}, jit_compile {model.jit_compile}, '
      f'{model.count_params():,} parameters')
  log(f'first step (build + trace): {first_s:.1f} s; warm-up steps: {warmup}')
  log(f'step time: median {step_s * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, '
      f'max {max(times) * 1e3:.1f}) over {steps} steps; batch '
      f'{config.batch_size}')
  log(f'process CPU time per step: median {step_cpu_s:.2f} s (all threads)')
  log(f'images/s: {images_per_sec:.1f}')
  log(f'tensorflow dense matmul peak (float32, {peak_matmul_size}^3, best of '
      f'5): {peak / 1e12:.4f} TFLOP/s')
  log(f'images_per_sec={images_per_sec:.3f}')
  return dict(images_per_sec=images_per_sec, step_s=step_s,
              step_cpu_s=step_cpu_s, peak_flops=peak,
              num_params=model.count_params(), jit_compile=model.jit_compile)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  retained = host_memory.configure(FLAGS.host_memory)
  print(f'host memory: {"retained" if retained else "system defaults"}')
  jit_compile = {'auto': 'auto', 'true': True, 'false': False}[
      FLAGS.jit_compile]
  benchmark(FLAGS.config, num_classes=FLAGS.num_classes, steps=FLAGS.steps,
            warmup=FLAGS.warmup, jit_compile=jit_compile,
            peak_matmul_size=FLAGS.peak_matmul_size)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
