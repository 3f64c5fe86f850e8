"""Fine-tuning at another resolution: the weights laid out over the patch grid.

`config.init_from` (`transfer.py`) may name a run trained at another
`image_size` (with the same `patch_size`, so on another patch grid). No
weight of the Perceiver depends on the number of patches except learned
position embeddings, one row per patch of the square grid (`GRID_PARAMS`).
Those are resampled to the new grid as big_vision's `resample_posemb` does
for ViT: reshaped to `[grid, grid, width]`, resized bilinearly, reshaped
back. The resize is the one the device applies to images
(`augment.resize`: TF's bilinear with half-pixel centres, no antialiasing),
so each row keeps its patch centre's place in the image; big_vision's
`scipy.ndimage.zoom(order=1)` aligns the corner patches instead. Fourier
position features have no parameters: the model computes them for the grid
it is given, with `fourier_max_resolution` setting their frequencies (0: the
grid, so the frequencies change with it; `model_fields_match` lets a run set
the source's grid explicitly to keep them).
"""

import logging
import math

import numpy as np

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.data import augment

# Model fields a fine-tuning run may change: the input's size.
FIELDS = ('image_size',)
# Parameters with one row per patch, row-major over the square patch grid:
# the seed's position embedding, and Perceiver IO's learned positions
# (`preprocessor='conv1x1'`, one per pixel).
GRID_PARAMS = ('patch_encoder/position_embedding',
               'conv1x1_encoder/position_embedding')


def grid_size(config):
  """Patches per side of `config`'s (square) images."""
  return config['image_size'] // config['patch_size']


def _fourier_max_resolution(config):
  value = config_lib.option(config, 'fourier_max_resolution')
  return value or grid_size(config)


def model_fields_match(name, saved, config):
  """Whether model field `name` differs between the source run's config
  (`saved`) and this one only as fine-tuning at another size allows.

  `image_size` may differ; `fourier_max_resolution` may differ when it
  gives the same frequencies (0 meaning the source's grid: a run at another
  size keeps them by setting that grid explicitly).
  """
  if name in FIELDS:
    return True
  if name == 'fourier_max_resolution':
    return (_fourier_max_resolution(saved) ==
            _fourier_max_resolution(config))
  return False


def describe(saved, config):
  """What changes with the grid, for the log; '' at the source's size."""
  old, new = grid_size(saved), grid_size(config)
  if old == new:
    return ''
  text = (f'image_size {saved["image_size"]} -> {config["image_size"]}: the '
          f'{old}x{old} patch grid becomes {new}x{new}')
  encoding = config_lib.option(config, 'position_encoding')
  if encoding == 'fourier':
    before = _fourier_max_resolution(saved)
    after = _fourier_max_resolution(config)
    text += (f'; Fourier position features are computed for it, max '
             f'resolution {before} -> {after}')
    if before != after:
      text += (f' (their frequencies change; --config.fourier_max_resolution'
               f'={before} keeps the source\'s)')
  return text


def follows_grid(name):
  """Whether parameter `name` ('a/b/c') has one row per patch."""
  return name in GRID_PARAMS


def resample_posemb(embedding, side):
  """`[n, width]` rows of a square grid, bilinearly resampled to
  `[side * side, width]` (float32; `augment.resize`'s bilinear)."""
  old = math.isqrt(len(embedding))
  grid = np.asarray(embedding, np.float32).reshape(1, old, old, -1)
  return np.asarray(augment.resize(grid, side)).reshape(side * side, -1)


def resample(name, pretrained, shape, source):
  """The pretrained grid parameter `name` resampled to `shape` (logged).

  Raises:
    errors.InputError: its rows form no square grid.
  """
  rows, side = len(pretrained), math.isqrt(shape[0])
  old = math.isqrt(rows)
  if rows == 0 or old * old != rows:
    raise errors.InputError(
        f'{name} in config.init_from={source!r} has {rows} rows, which form '
        'no square patch grid, so it cannot be resampled to this run\'s '
        f'{side}x{side} patches. Fine-tune at the image_size it was trained '
        'at, or from a run whose position embedding covers a square grid.')
  logging.info('Resampled %s from the %dx%d patch grid to %dx%d (bilinear).',
               name, old, old, side, side)
  return resample_posemb(pretrained, side)
