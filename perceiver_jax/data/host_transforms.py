"""What the host does to a stored image: decode, and crops that change shape.

Everything after a fixed-shape uint8 batch (normalisation, flips and zooms of
the seed, RandAugment, MixUp/CutMix) runs on the device (`augment.py`);
what cannot (decoding, cropping images of varying size) runs here, in the
input workers, with Pillow and numpy only (no tensorflow, no jax): nothing
here asks for a device, so the workers never initialise a jax backend or
`jax.distributed`.

`crop='none'`: the image as stored (resized whole to `size` x `size`, with
Pillow's bilinear filter, when the dataset's images vary in size).
`crop='inception'` (Szegedy et al. 2015; the Perceiver's ImageNet setup):
training takes a random crop covering 8% to 100% of the image with aspect
ratio 3/4 to 4/3, resized to `size` x `size`, flipped left-right with
probability 1/2; evaluation resizes the shorter side to
`size / eval_crop_fraction` (256 for 224 at 0.875) and takes the centre
`size` x `size`. Here `size` is the model's `image_size`, whatever size the
dataset stores (`served_size`), so a fixed-size dataset's crops fit the
batch and are not upsampled again on the device. JPEGs are decoded at the
smallest DCT scale that still covers the crop (`Image.draft`), which is
what makes the decode cheap.

A stored image Pillow cannot decode (a truncated JPEG, bytes that are no
image) raises `DecodeError`, from the Pillow calls only, so a bug here keeps
its own type; the caller names the record (`records.py`).

Every random choice is drawn from `numpy.random.default_rng` seeded by
(seed, epoch, record), so a batch is a pure function of the run's seed,
epoch and step, whichever worker decodes it.
"""

import dataclasses
import io
import math

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from perceiver_jax import checks
from perceiver_jax import config_lib

CROPS = ('none', 'inception')
# The host transform's options, as the config takes them.
RULES = {
    'host_crop': checks.one_of(*CROPS),
    'eval_crop_fraction': checks.number(
        0.0, 1.0, low_open=True, requirement='in (0, 1]', example=0.875),
}
OPTION_DEFAULTS = {'host_crop': 'none', 'eval_crop_fraction': 0.875}
AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)
_ATTEMPTS = 10  # Random boxes tried before the central fallback.
_RNG_STREAM = 1  # Keeps these draws apart from the sampler's permutations.


def served_size(crop, height, width, image_size):
  """`(height, width)` of the images the host serves for `crop`.

  Inception crops, and images stored at varying sizes (`height` or `width`
  None), come out `image_size` square; other images keep their stored size.
  """
  if crop == 'inception' or height is None or width is None:
    return image_size, image_size
  return height, width


class DecodeError(Exception):
  """Stored image bytes that Pillow cannot decode; the message says why."""


def _decoded(call, *args):
  """`call(*args)`, a Pillow call that parses or decodes the stored bytes.

  Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
  on malformed data, and only Pillow's call is inside this `try`.
  """
  try:
    return call(*args)
  except UnidentifiedImageError:  # Its message names a BytesIO object.
    raise DecodeError('not an image (Pillow knows no format of its bytes)'
                      ) from None
  except Exception as e:  # pylint: disable=broad-except
    raise DecodeError(f'{type(e).__name__}: {e}') from None


def moment_sums(images, channels):
  """float64 [count, sum, sum of squares] per channel of uint8 `images`.

  Exact while pixels x 255^2 stays below 2^53 (all of ImageNet at 224 x 224
  is 4.2e15), so E[x^2] - E[x]^2 loses nothing to accumulation there.
  """
  x = np.asarray(images).reshape(-1, channels).astype(np.float64)
  return np.stack([np.full(channels, len(x), np.float64), x.sum(0),
                   np.square(x).sum(0)])


def inception_box(width, height, rng, area_range=AREA_RANGE,
                  aspect_range=ASPECT_RANGE):
  """`(left, top, width, height)` of a random crop, as Inception samples it.

  Up to 10 boxes of random area fraction and log-uniform aspect ratio are
  tried; the first that fits is placed uniformly. Failing that, the largest
  central box within the aspect range.
  """
  total = width * height
  log_low, log_high = (math.log(a) for a in aspect_range)
  for _ in range(_ATTEMPTS):
    target = total * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(log_low, log_high))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return (int(rng.integers(0, width - w + 1)),
              int(rng.integers(0, height - h + 1)), w, h)
  ratio = width / height
  if ratio < aspect_range[0]:
    w, h = width, int(round(width / aspect_range[0]))
  elif ratio > aspect_range[1]:
    w, h = int(round(height * aspect_range[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def _crop_resized(image, box, size):
  """The `box` of `image` resized to `size` x `size` (decoded lazily).

  For a JPEG, first asks the decoder for the smallest DCT scale (1/2, 1/4,
  1/8) that keeps the box at least `size` pixels wide and high.
  """
  left, top, w, h = box
  width, height = image.size
  if image.format == 'JPEG':
    image.draft(image.mode, (math.ceil(width * size / w),
                             math.ceil(height * size / h)))
  _decoded(image.load)
  sx, sy = image.size[0] / width, image.size[1] / height
  return image.resize(
      (size, size), Image.Resampling.BILINEAR,
      box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


@dataclasses.dataclass(frozen=True)
class HostTransform:
  """Stored image bytes -> uint8 `[height, width, channels]`.

  Attributes:
    crop: one of CROPS.
    height, width: the output size (`served_size`; 'inception': square).
    channels: 1 (grayscale) or 3 (RGB).
    eval_crop_fraction: 'inception' evaluation: the centre crop's share of
      the resized shorter side.
  """
  crop: str
  height: int
  width: int
  channels: int
  eval_crop_fraction: float = 0.875

  def __post_init__(self):
    if self.crop == 'inception' and self.height != self.width:
      raise ValueError(f'Inception crops are square; got {self.height} x '
                       f'{self.width} (see served_size).')

  @classmethod
  def from_config(cls, config, info):
    """The transform of a run's data; `info` a `datasets.DatasetInfo`."""
    return cls(config_lib.option(config, 'host_crop'),
               info.height, info.width, info.channels,
               config_lib.option(config, 'eval_crop_fraction'))

  def _open(self, data):
    """The image, its header read (JPEGs: not decoded, so they can draft)."""
    image = _decoded(Image.open, io.BytesIO(data))
    mode = 'L' if self.channels == 1 else 'RGB'
    if image.mode != mode and image.format != 'JPEG':
      image = _decoded(image.convert, mode)  # JPEGs: draft, then convert.
    return image, mode

  def decode(self, data):
    """The whole stored image, decoded at full size (uint8 `[h, w, c]`)."""
    image, mode = self._open(data)
    _decoded(image.load)
    return self._array(image, mode)

  def _array(self, image, mode):
    if image.mode != mode:
      image = image.convert(mode)
    array = np.asarray(image, np.uint8)
    return array.reshape(array.shape[:2] + (self.channels,))

  def eval(self, data):
    """The evaluation view of one stored image."""
    return self.eval_view(*self._open(data))

  def eval_view(self, image, mode=None):
    """The evaluation view of a PIL `image` (any size; `mode`: its target
    mode, 'L' or 'RGB', when it is still to be converted)."""
    mode = mode or image.mode
    width, height = image.size
    if self.crop == 'inception':
      side = self.eval_crop_fraction * min(width, height)
      box = ((width - side) / 2, (height - side) / 2, side, side)
      image = _crop_resized(image, box, self.height)
    else:
      _decoded(image.load)
      if (width, height) != (self.width, self.height):
        image = image.resize((self.width, self.height),
                             Image.Resampling.BILINEAR)
    return self._array(image, mode)

  def train(self, data, seed, epoch, record):
    """The training view of record `record` (its index in the tfds split)."""
    if self.crop != 'inception':
      return self.eval(data)
    rng = np.random.default_rng([seed, _RNG_STREAM, epoch, record])
    image, mode = self._open(data)
    box = inception_box(*image.size, rng)
    array = self._array(_crop_resized(image, box, self.height), mode)
    return array[:, ::-1] if rng.random() < 0.5 else array
