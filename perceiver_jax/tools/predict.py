"""`--mode=predict`: classify image files with the weights training tested.

Each file (any format Pillow decodes: PNG, JPEG, ...; any size, mode and
channel count) is brought to what the dataset's own images look like: EXIF
orientation applied, transparency composited onto white, converted to the
dataset's channels (grayscale 'L' or 'RGB'). Then it gets the evaluation
view the host gives the dataset's images (`host_transforms.HostTransform`):
resized whole to the dataset's native size (CIFAR: 32 x 32) with Pillow's
antialiased bilinear filter, aspect ratio not kept, or with
`host_crop='inception'` the shorter side resized to
`image_size / eval_crop_fraction` and the centre `image_size` square. From
there it is exactly the evaluation path of training:
`augment.preprocess_eval` with the workdir's normalisation statistics, then
the model without dropout.
"""

import dataclasses
from typing import Optional, Sequence
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps
from PIL import UnidentifiedImageError

from perceiver_jax import errors
from perceiver_jax.data import datasets
from perceiver_jax.data import host_transforms
from perceiver_jax.tools import trained as trained_lib

TOP_K = 5


# Pillow's decompression-bomb limit: a file may declare at most this many
# pixels (89,478,485, about 9459 x 9459), however small the file itself is.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def load_image(path, transform):
  """Decodes `path` into `transform`'s uint8 evaluation view (module doc).

  Args:
    path: an image file.
    transform: the run's `host_transforms.HostTransform`.

  Raises:
    errors.InputError: one sentence naming the file and why it cannot be
      used (missing, not an image, truncated, or declaring more than
      `MAX_IMAGE_PIXELS` pixels).
  """
  try:
    with warnings.catch_warnings():
      # Above the limit Pillow only warns (an error from twice the limit).
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
  except UnidentifiedImageError:
    raise errors.InputError(
        f'{path} is not an image Pillow can decode; pass PNG or JPEG files.'
    ) from None
  except (Image.DecompressionBombWarning, Image.DecompressionBombError):
    raise errors.InputError(
        f'{path} declares more than {MAX_IMAGE_PIXELS:,} pixels, the limit '
        'on decoded image size; pass a smaller image.') from None
  except OSError as e:  # Missing, unreadable or truncated.
    reason = e.strerror or str(e)
    raise errors.InputError(f'Cannot read image {path}: {reason}.') from None
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's decoders also raise SyntaxError, ValueError, EOFError, ...
    # on malformed files; only Pillow's calls are inside this `try`.
    raise errors.InputError(
        f'Cannot read image {path}: {type(e).__name__}: {e}.') from None
  if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, image.convert('RGBA'))
  channels = transform.channels
  if channels == 1:
    image = image.convert('L')
  elif channels == 3:
    image = image.convert('RGB')
  else:
    raise errors.InputError(
        f'Images with {channels} channels are not supported; '
        'the dataset must have 1 (grayscale) or 3 (RGB).')
  return transform.eval_view(image)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The most probable classes of one image."""
  classes: tuple[str, ...]  # Class names, most probable first.
  probabilities: tuple[float, ...]  # Their softmax probabilities.
  path: Optional[str] = None  # The image file, when it came from one.


def top_k(probabilities, names, k=TOP_K):
  """The `k` most probable (name, probability) pairs, most probable first."""
  order = np.argsort(-probabilities, kind='stable')[:k]
  return tuple(names[i] for i in order), tuple(
      float(probabilities[i]) for i in order)


def softmax(logits):
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def load_images(paths, config, info):
  """Every file decoded for the run of `config` on the data `info`
  describes; each unusable file fails before the model loads."""
  transform = host_transforms.HostTransform.from_config(config, info)
  return np.stack([load_image(p, transform) for p in paths])


def classify(trained, images, k=TOP_K, paths=None):
  """A Prediction of the top `k` classes of each image.

  Args:
    trained: a `trained.TrainedModel`.
    images: uint8 `[n, *trained.input_shape]`.
    k: how many classes per image (at most all of them).
    paths: the files the images came from, if they did.

  Raises:
    errors.InputError: `k` is not a positive integer, or the images do not
      fit (`TrainedModel.check_images`).
  """
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise errors.InputError(
        f'top_k={k!r} must be a positive integer (the number of classes to '
        f'return per image, e.g. {TOP_K}).')
  probabilities = softmax(trained.logits(images))
  paths = [None] * len(probabilities) if paths is None else paths
  return [Prediction(*top_k(p, trained.class_names, k),
                     path=None if path is None else str(path))
          for p, path in zip(probabilities, paths)]


def predict(trained, paths, k=TOP_K, images=None):
  """Top-`k` classes of each image file, as a list of Prediction.

  `images`: the files already decoded by `load_images`, if they are.
  """
  if images is None:
    images = load_images(paths, trained.config, trained.info)
  return classify(trained, images, k, paths)


def format_prediction(prediction):
  """`path` then one `  1. name  41.23%` line per class."""
  width = max(len(c) for c in prediction.classes)
  lines = [f'{prediction.path}:']
  for rank, (name, p) in enumerate(
      zip(prediction.classes, prediction.probabilities), start=1):
    lines.append(f'  {rank}. {name:<{width}}  {p * 100:6.2f}%')
  return '\n'.join(lines)


def run(workdir, paths: Sequence[str], *, overrides=None, k=TOP_K):
  """`--mode=predict`: checks the workdir and files, then prints the top `k`."""
  if not paths:
    raise errors.InputError('No images given; pass --images=a.png,b.jpg.')
  trained_lib.check_workdir(workdir)
  config = trained_lib.load_config(workdir, overrides)
  # Decode everything first: a bad file fails in seconds, not after loading.
  info = datasets.get_dataset_info(config)
  images = load_images(paths, config, info)
  trained = trained_lib.load(workdir, mesh=trained_lib.single_device_mesh(),
                             config=config, info=info)
  predictions = predict(trained, paths, k, images=images)
  ema = ', EMA weights' if trained.uses_ema else ''
  print(f'Top {k} classes by the {trained.checkpoint} checkpoint (step '
        f'{trained.step}{ema}) of {workdir}:')
  for prediction in predictions:
    print(format_prediction(prediction))
  return predictions
