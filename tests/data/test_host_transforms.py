"""host_transforms: decoding and the Inception crops, against tf.image."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import fake_data
from perceiver_jax.data import datasets
from perceiver_jax.data import host_transforms
from perceiver_jax.data import input_pipeline

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


def _encode(array, fmt='PNG', quality=95):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, quality=quality)
  return buffer.getvalue()


def _smooth_image(height, width, seed=0):
  """A smooth RGB image: resampling differences stay small on it."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  channels = [np.sin(rng.uniform(1, 6) * x + rng.uniform(1, 6) * y +
                     rng.uniform(0, 6)) for _ in range(3)]
  return ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)


def test_inception_boxes_fit_and_follow_the_ranges():
  areas, aspects = [], []
  for seed in range(300):
    rng = np.random.default_rng(seed)
    width, height = rng.integers(40, 600, 2)
    left, top, w, h = host_transforms.inception_box(width, height, rng)
    assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
    areas.append(w * h / (width * height))
    aspects.append(w / h)
    # Rounding to whole pixels moves both a little off the sampled values.
    assert 0.08 * 0.9 <= areas[-1] <= 1.0, (areas[-1], width, height)
    assert 3 / 4 * 0.9 <= aspects[-1] <= 4 / 3 * 1.1, (aspects[-1], width,
                                                        height)
  # And on square images, where every sampled box fits (no fallback to the
  # centre), they span the ranges: area 8%..100%, aspect 3/4..4/3.
  boxes = [host_transforms.inception_box(400, 400, np.random.default_rng(s))
           for s in range(300)]
  areas = [w * h / 400**2 for _, _, w, h in boxes]
  aspects = [w / h for _, _, w, h in boxes]
  assert min(areas) < 0.12 and max(areas) > 0.9, (min(areas), max(areas))
  assert min(aspects) < 0.8 and max(aspects) > 1.25, (min(aspects),
                                                      max(aspects))


def test_inception_boxes_are_placed_uniformly():
  # Each box's offset is uniform over the room the image leaves it, along
  # both axes: not pinned to a corner or the centre.
  placements = []
  for seed in range(400):
    left, top, w, h = host_transforms.inception_box(
        400, 300, np.random.default_rng(seed))
    if w < 380 and h < 280:  # Room to move along both axes.
      placements.append((left / (400 - w), top / (300 - h)))
  placements = np.asarray(placements)
  assert len(placements) > 300
  for axis in placements.T:  # Uniform on [0, 1]: mean 1/2, var 1/12.
    assert abs(axis.mean() - 0.5) < 0.05, axis.mean()
    assert abs(axis.var() - 1 / 12) < 0.02, axis.var()
    assert axis.min() < 0.02 and axis.max() > 0.98


def test_inception_box_falls_back_to_the_centre():
  # 1000 x 10: no box of aspect 3/4..4/3 and area >= 8% fits; the largest
  # central box of aspect 4/3 is taken.
  box = host_transforms.inception_box(1000, 10, np.random.default_rng(0))
  assert box == (493, 0, 13, 10)


def test_training_view_is_a_function_of_seed_epoch_and_record():
  data = _encode(_smooth_image(120, 160), 'JPEG')
  transform = host_transforms.HostTransform('inception', 32, 32, 3)
  one = transform.train(data, seed=3, epoch=5, record=17)
  assert one.shape == (32, 32, 3) and one.dtype == np.uint8
  np.testing.assert_array_equal(one, transform.train(data, 3, 5, 17))
  others = [transform.train(data, 3, e, r) for e, r in ((6, 17), (5, 18))]
  others.append(transform.train(data, 4, 5, 17))
  assert not any(np.array_equal(one, o) for o in others)


def test_training_flips_half_the_views():
  data = _encode(_smooth_image(64, 64), 'PNG')
  transform = host_transforms.HostTransform('inception', 16, 16, 3)
  flips = []
  for record in range(400):
    rng = np.random.default_rng([0, host_transforms._RNG_STREAM, 0, record])
    host_transforms.inception_box(64, 64, rng)
    flips.append(rng.random() < 0.5)
  assert 160 < sum(flips) < 240  # Binomial(400, 1/2): 6 sigma.
  # The flip drawn after the box is applied: the view is the mirrored crop.
  record = flips.index(True)
  rng = np.random.default_rng([0, host_transforms._RNG_STREAM, 0, record])
  box = host_transforms.inception_box(64, 64, rng)
  unflipped = np.asarray(Image.open(io.BytesIO(data)).resize(
      (16, 16), Image.Resampling.BILINEAR,
      box=(box[0], box[1], box[0] + box[2], box[1] + box[3])))
  np.testing.assert_array_equal(transform.train(data, 0, 0, record),
                                unflipped[:, ::-1])


def test_training_crop_matches_tf_crop_and_resize():
  image = _smooth_image(375, 500)
  data = _encode(image, 'PNG')
  transform = host_transforms.HostTransform('inception', 64, 64, 3)
  for record in range(5):
    rng = np.random.default_rng([1, host_transforms._RNG_STREAM, 2, record])
    left, top, w, h = host_transforms.inception_box(500, 375, rng)
    flip = rng.random() < 0.5
    want = tf.image.resize(image[top:top + h, left:left + w], (64, 64),
                           antialias=True).numpy()
    if flip:
      want = want[:, ::-1]
    got = transform.train(data, 1, 2, record).astype(np.float64)
    assert np.abs(got - want).mean() < 1.0, record


def test_evaluation_view_matches_tf_resize_and_central_crop():
  image = _smooth_image(375, 500)
  transform = host_transforms.HostTransform('inception', 224, 224, 3)
  got = transform.eval(_encode(image, 'PNG')).astype(np.float64)
  # Shorter side to 256 (= 224 / 0.875), then the central 224 x 224.
  resized = tf.image.resize(image, (256, 341), antialias=True).numpy()
  left = (341 - 224) // 2
  want = resized[16:240, left:left + 224]
  assert got.shape == (224, 224, 3)
  assert np.abs(got - want).mean() < 1.5


def test_jpeg_draft_decoding_stays_close_to_a_full_decode():
  image = _smooth_image(375, 500)
  data = _encode(image, 'JPEG', quality=90)
  transform = host_transforms.HostTransform('inception', 64, 64, 3)
  full = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  for record in range(5):
    rng = np.random.default_rng([0, host_transforms._RNG_STREAM, 0, record])
    left, top, w, h = host_transforms.inception_box(500, 375, rng)
    flip = rng.random() < 0.5
    want = np.asarray(Image.fromarray(full).resize(
        (64, 64), Image.Resampling.BILINEAR,
        box=(left, top, left + w, top + h))).astype(np.float64)
    if flip:
      want = want[:, ::-1]
    got = transform.train(data, 0, 0, record).astype(np.float64)
    assert np.abs(got - want).mean() < 2.0, record


@pytest.mark.parametrize('mode,channels', [('RGB', 3), ('L', 1)])
def test_whole_images_are_kept_as_stored(mode, channels):
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  stored = Image.fromarray(image).convert(mode)
  data = _encode(np.asarray(stored))
  transform = host_transforms.HostTransform('none', 32, 32, channels)
  got = transform.eval(data)
  assert got.shape == (32, 32, channels)
  np.testing.assert_array_equal(got.reshape(np.asarray(stored).shape),
                                np.asarray(stored))
  np.testing.assert_array_equal(transform.train(data, 0, 0, 0), got)
  # Images of other sizes are resized whole.
  assert host_transforms.HostTransform('none', 16, 24, channels).eval(
      data).shape == (16, 24, channels)


@pytest.mark.parametrize('dataset', ['cifar100', 'tiny_rectangles'])
def test_inception_views_of_fixed_size_data_are_image_size(
    dataset, fake_cifar100, tiny_rectangles):
  # CIFAR stores 32 x 32, TinyRectangles 24 x 40; the model takes 48 x 48.
  data_dir = {'cifar100': fake_cifar100.data_dir,
              'tiny_rectangles': tiny_rectangles}[dataset]
  config = fake_data.get_config()
  config.update(dict(mock_data=False, dataset=dataset, tfds_data_dir=data_dir,
                     host_crop='inception', device_augment='none',
                     image_size=48, batch_size=8, data_workers=0))
  with input_pipeline.Pipeline(config, num_shards=2,
                               shard_indices=[0, 1]) as pipeline:
    assert (pipeline.info.height, pipeline.info.width) == (48, 48)
    assert pipeline.train_batch(0, 0)['image'].shape == (8, 48, 48, 3)
    test = next(pipeline.eval_batches('test'))['image']
    assert test.shape == (8, 48, 48, 3)
    # Statistics over the evaluation views, as the model sees them.
    stats = pipeline.normalization_stats()
  assert stats['mean'].shape == (3,) and np.all(stats['variance'] > 0)
  # The views are drawn from the stored image at its own size: an
  # evaluation view is the centre of the stored image, resized.
  source = datasets.data_source(datasets.builder(config), 'test', config)
  stored = np.asarray(Image.open(io.BytesIO(source[0]['image'])))
  height, width = stored.shape[:2]
  side = 0.875 * min(height, width)
  want = np.asarray(Image.fromarray(stored).resize(
      (48, 48), Image.Resampling.BILINEAR,
      box=((width - side) / 2, (height - side) / 2, (width + side) / 2,
           (height + side) / 2)))
  np.testing.assert_array_equal(test[0], want)
