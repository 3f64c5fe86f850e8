"""Fourier position features of the Perceiver paper (Jaegle et al. 2021, 3.1).

The paper replaces learned position embeddings with fixed sine/cosine features
of each input's coordinates, so the model knows where a pixel or patch is
without learning it and without a table tied to one input size. The layout
matches DeepMind's `perceiver/position_encoding.py`
(`build_linear_positions`, `generate_fourier_features`), so features and
weights line up with that implementation. The features are constants of
the grid, computed in float64 with numpy and rounded once to float32: the
highest bands' arguments reach pi * max_resolution / 2, where float32
linspaces differ between libraries by 1e-5 relative (jnp.linspace's error
is 3x torch's), which a model imported from another implementation would
otherwise see.
"""

from typing import Sequence

import numpy as np

FOURIER_MODES = ('concat', 'add')
POSITION_ENCODINGS = ('learned', 'fourier')


def build_linear_positions(index_dims: Sequence[int],
                           output_range=(-1.0, 1.0)):
  """Coordinates of an N-D grid, spaced linearly in `output_range` per axis.

  Args:
    index_dims: grid size per axis, e.g. (rows, cols).
    output_range: (min, max) of every axis; a size-1 axis sits at min.

  Returns:
    float64 `[*index_dims, len(index_dims)]`; last axis: (row, col, ...).
  """
  axes = [np.linspace(output_range[0], output_range[1], num=n,
                      endpoint=True, dtype=np.float64) for n in index_dims]
  return np.stack(np.meshgrid(*axes, indexing='ij'), axis=-1)


def num_fourier_features(num_dims, num_bands, concat_pos=True):
  """Width of `generate_fourier_features`: d * (2 * num_bands + concat_pos)."""
  return num_dims * (2 * num_bands + int(concat_pos))


def generate_fourier_features(pos, num_bands: int,
                              max_resolution: Sequence[int],
                              concat_pos: bool = True):
  """Sine and cosine features of positions, at linearly spaced frequencies.

  Frequencies run linearly from 1 to `max_resolution / 2` (the Nyquist
  frequency of a grid that size) per axis; positions are in [-1, 1], so the
  highest band alternates sign from one grid point to the next.

  Args:
    pos: `[n, d]` positions of n points in d dimensions.
    num_bands: K, frequencies per axis.
    max_resolution: d grid sizes that set each axis' highest frequency.
    concat_pos: prepend the raw positions, as DeepMind's default does.

  Returns:
    float32 `[n, d * (2K + concat_pos)]`, ordered
    `[pos_1..pos_d, sin(pi f_1 pos_1)..sin(pi f_K pos_1), ..., sin(.. pos_d),
    cos(pi f_1 pos_1)..cos(pi f_K pos_1), ..., cos(.. pos_d)]`.
  """
  if num_bands <= 0:
    raise ValueError(f'num_bands must be positive, got {num_bands}.')
  if pos.ndim != 2 or pos.shape[1] != len(max_resolution):
    raise ValueError(f'pos must be [n, {len(max_resolution)}] to match '
                     f'max_resolution {tuple(max_resolution)}, got shape '
                     f'{pos.shape}.')
  pos = np.asarray(pos, np.float64)
  freq_bands = np.stack([
      np.linspace(1.0, res / 2, num=num_bands, endpoint=True)
      for res in max_resolution], axis=0)  # [d, K]
  per_pos = (pos[:, :, None] * freq_bands[None]).reshape(pos.shape[0], -1)
  features = [np.sin(np.pi * per_pos), np.cos(np.pi * per_pos)]
  if concat_pos:
    features.insert(0, pos)
  return np.concatenate(features, axis=-1).astype(np.float32)


def fourier_position_encoding(index_dims: Sequence[int], num_bands: int,
                              max_resolution=None):
  """Fourier features of every point of a row-major grid `index_dims`.

  Args:
    index_dims: grid size per axis, e.g. the patch grid (rows, cols).
    num_bands: frequencies per axis.
    max_resolution: int or per-axis sizes setting the top frequency; None or
      0 uses `index_dims` (the paper's choice: Nyquist of the input grid).

  Returns:
    float32 `[prod(index_dims), len(index_dims) * (2 * num_bands + 1)]`, in
    the row-major order of `extract_patches`.
  """
  if not max_resolution:
    max_resolution = tuple(index_dims)
  elif np.ndim(max_resolution) == 0:
    max_resolution = (max_resolution,) * len(index_dims)
  pos = build_linear_positions(index_dims).reshape(-1, len(index_dims))
  return generate_fourier_features(pos, num_bands, max_resolution)
