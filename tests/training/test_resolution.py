"""Fine-tuning at another resolution: which weights follow the patch grid,
and their resampling against TensorFlow's bilinear resize."""

import jax
import numpy as np
import pytest
import tensorflow as tf

from perceiver_jax import errors
from perceiver_jax.training import resolution
from perceiver_jax.training import sharding
from tests.model.test_perceiver_options import param_shapes
from tests.model.test_perceiver_options import tiny_config
from tests.model.test_perceiver_options import VARIANTS


def tf_resized(embedding, side):
  """The reference: reshape to the grid, `tf.image.resize`, reshape back."""
  old = int(round(len(embedding) ** 0.5))
  grid = tf.constant(embedding.reshape(1, old, old, -1))
  resized = tf.image.resize(grid, (side, side), method='bilinear',
                            antialias=False)
  return resized.numpy().reshape(side * side, -1)


@pytest.mark.parametrize('old,new', [(4, 8), (4, 7), (8, 3), (5, 5), (1, 3),
                                     (3, 1)])
def test_resampling_is_tfs_bilinear_resize_of_the_grid(old, new):
  embedding = np.random.default_rng(old * 10 + new).normal(
      size=(old * old, 6)).astype(np.float32)
  got = resolution.resample_posemb(embedding, new)
  assert got.shape == (new * new, 6) and got.dtype == np.float32
  np.testing.assert_allclose(got, tf_resized(embedding, new), rtol=1e-6,
                             atol=1e-6)


def test_a_non_square_embedding_is_refused_by_name():
  with pytest.raises(errors.InputError) as e:
    resolution.resample('patch_encoder/position_embedding',
                        np.zeros((12, 4), np.float32), (64, 4), '/runs/src')
  message = str(e.value)
  assert message.startswith(
      "patch_encoder/position_embedding in config.init_from='/runs/src' has "
      '12 rows, which form no square patch grid')
  assert "this run's 8x8 patches. Fine-tune at the image_size" in message
  with pytest.raises(errors.InputError, match='has 0 rows'):
    resolution.resample('patch_encoder/position_embedding',
                        np.zeros((0, 4), np.float32), (64, 4), '/runs/src')


# Perceiver IO's arrangement with each of its preprocessors, in miniature.
_PERCEIVER_IO = dict(
    patch_size=1, cross_attention_width='input', num_cross_heads=1,
    cross_attention_residual='pre_norm', cross_attend='first_iteration',
    decoder='perceiver_io', classifier_units=(), latent_head_width='split')
PERCEIVER_IO_VARIANTS = [
    dict(_PERCEIVER_IO, preprocessor='conv1x1', preprocessor_channels=4),
    dict(_PERCEIVER_IO, preprocessor='patches', position_encoding='fourier',
         fourier_max_resolution=8),
    dict(_PERCEIVER_IO, preprocessor='conv', preprocessor_channels=4,
         position_encoding='fourier', fourier_max_resolution=4),
]


@pytest.mark.parametrize('overrides', VARIANTS + PERCEIVER_IO_VARIANTS)
def test_only_the_grid_params_depend_on_the_image_size(overrides):
  # Fourier features and the inputs' width ('input' cross-attention) are
  # the same at every grid; only GRID_PARAMS change shape.
  configs = [tiny_config(image_size=size, **overrides) for size in (8, 12)]
  shapes = [{sharding.path_name(p): x.shape for p, x in
             jax.tree_util.tree_flatten_with_path(param_shapes(c))[0]}
            for c in configs]
  assert shapes[0].keys() == shapes[1].keys()
  changed = {n for n in shapes[0] if shapes[0][n] != shapes[1][n]}
  learned = configs[0].get('position_encoding', 'learned') == 'learned'
  assert bool(changed) == learned
  assert changed <= set(resolution.GRID_PARAMS)
  for name in changed:  # One row per patch of each grid.
    assert [s[name][0] for s in shapes] == [
        resolution.grid_size(c) ** 2 for c in configs]


def _config(**fields):
  return dict({'image_size': 16, 'patch_size': 4}, **fields)


def test_image_size_may_differ_and_fourier_frequencies_must_not():
  match = resolution.model_fields_match
  assert match('image_size', _config(), _config(image_size=32))
  assert not match('patch_size', _config(), _config(patch_size=2))
  # 0 means the grid: 4 at 16 / 4, so an explicit 4 keeps the frequencies.
  assert match('fourier_max_resolution', _config(fourier_max_resolution=0),
               _config(image_size=32, fourier_max_resolution=4))
  assert match('fourier_max_resolution', _config(fourier_max_resolution=8),
               _config(image_size=32, fourier_max_resolution=0))
  assert not match('fourier_max_resolution', _config(fourier_max_resolution=4),
                   _config(fourier_max_resolution=6))


def test_the_log_says_what_follows_the_grid():
  assert resolution.describe(_config(), _config()) == ''
  assert resolution.describe(_config(), _config(image_size=32)) == (
      'image_size 16 -> 32: the 4x4 patch grid becomes 8x8')
  fourier = dict(position_encoding='fourier', fourier_max_resolution=0)
  assert resolution.describe(
      _config(**fourier), _config(image_size=32, **fourier)) == (
          'image_size 16 -> 32: the 4x4 patch grid becomes 8x8; Fourier '
          'position features are computed for it, max resolution 4 -> 8 '
          "(their frequencies change; --config.fourier_max_resolution=4 "
          "keeps the source's)")
  kept = dict(fourier, fourier_max_resolution=4)
  assert resolution.describe(
      _config(**fourier), _config(image_size=32, **kept)).endswith(
          'computed for it, max resolution 4 -> 4')
