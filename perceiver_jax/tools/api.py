"""The Python API: a trained workdir's model for notebooks and scripts.

```python
import perceiver_jax
model = perceiver_jax.load('runs/cifar100')      # or gs://BUCKET/run
model.logits(images)                             # numpy [N, num_classes]
model.predict(images, top_k=5)[0].classes        # ('cat', 'leopard', ...)
model.predict(model.load_images(['cat.jpg']))    # image files, any size
```

`load` restores what `--mode=eval` uses (`trained.py`): the workdir's config,
its normalisation statistics, the class names and the weights the end of
training tested (the EMA weights when the run kept them), on one device.
The model takes uint8 images `[N, *input_shape]`: what the run's evaluation
feeds the device, i.e. the dataset's images as stored (CIFAR: 32 x 32, which
the device resizes to `image_size`), or the `image_size` square of the
evaluation view for runs with Inception crops or datasets of varying image
size. From there the computation is `--mode=eval`'s; `load_images` brings
image files of any size to that view as `--mode=predict` does.
"""

from typing import Sequence

from perceiver_jax.tools import predict as predict_lib
from perceiver_jax.tools import trained as trained_lib


class Classifier:
  """A trained run's image classifier; see the module docstring.

  Attributes:
    workdir: the training run's workdir.
    config: its config (a ConfigDict; read it, don't change it).
    class_names: one name per logit.
    input_shape: `(height, width, channels)` of the images it takes.
    step: the training step of the restored weights.
    checkpoint: which checkpoint: 'best', 'latest' or 'last readable'.
  """

  def __init__(self, trained):
    self._trained = trained
    self.workdir = trained.workdir
    self.config = trained.config
    self.class_names = tuple(trained.class_names)
    self.input_shape = trained.input_shape
    self.step = trained.step
    self.checkpoint = trained.checkpoint

  def __repr__(self):
    height, width, channels = self.input_shape
    ema = ', EMA weights' if self._trained.uses_ema else ''
    return (f'<perceiver_jax Classifier of {self.workdir}: {self.checkpoint} '
            f'checkpoint, step {self.step}{ema}; takes uint8 [N, {height}, '
            f'{width}, {channels}], {len(self.class_names)} classes>')

  def logits(self, images, batch_size=64):
    """float32 numpy logits `[N, num_classes]` of uint8 images
    `[N, *input_shape]`, as `--mode=eval` computes them, `batch_size`
    images per forward pass (it bounds the device memory used).

    Raises:
      errors.InputError: images of another shape or dtype.
    """
    return self._trained.logits(images, batch_size)

  def predict(self, images, top_k=predict_lib.TOP_K):
    """The `top_k` most probable classes of each image.

    Args:
      images: uint8 `[N, *input_shape]`.
      top_k: classes per image (more than there are gives all of them).

    Returns:
      One `Prediction` per image: `.classes`, the class names, most probable
      first, and `.probabilities`, their softmax probabilities (over all
      classes, so they sum to at most 1).
    """
    return predict_lib.classify(self._trained, images, top_k)

  def load_images(self, paths: Sequence[str]):
    """Image files (any format Pillow decodes, any size and channel count)
    as uint8 `[N, *input_shape]`, decoded as `--mode=predict` decodes them:
    EXIF orientation, transparency onto white, the dataset's channels, then
    the evaluation view of the dataset's images.

    Raises:
      errors.InputError: a file that is missing or not an image, named.
    """
    return predict_lib.load_images(list(paths), self.config,
                                   self._trained.info)


def load(workdir, *, overrides=None):
  """The model a training run's workdir holds, ready to classify images.

  Args:
    workdir: the training run's `--workdir`, local or gs://.
    overrides: `{field: value}` of the fields the tools may change
      (`config_lib.TOOL_OVERRIDABLE_FIELDS`, e.g. `{'dtype': 'bfloat16'}`).

  Returns:
    A `Classifier` on this process's first device.

  Raises:
    errors.InputError: the workdir holds no trained run (no config.json,
      normalization.json or checkpoint), or an override is not allowed.
  """
  trained_lib.check_workdir(workdir)
  return Classifier(trained_lib.load(
      workdir, overrides=overrides, mesh=trained_lib.single_device_mesh()))
