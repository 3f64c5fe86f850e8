"""`--mode=attention`: where a trained Perceiver's latents look in an image.

The encoder cross-attention's weights `[batch, heads, latents, inputs]`
(sown by the model when 'intermediates' is mutable, one entry per
cross-attend: every iteration, or only the first with
`cross_attend='first_iteration'`) are averaged over heads, taken from one
cross-attend (the last by default, the nearest to the classifier; or their
mean, or cross-attend k), and reshaped to the input grid (the patch grid,
or the conv stem's 4x smaller one). Every latent's map is a softmax over
the inputs, so it sums to 1; the mean over latents therefore sums to 1 too.

The PNG has a title strip of `HEADER` pixels, then one row per test image of
`2 + num_latents` square tiles of `tile` pixels: the image as the dataset
stores it, the map averaged over all latents, and single latents evenly
spaced over the latent array (for 4 of 256: 0, 85, 170, 255). Maps are
upsampled to the tile by nearest neighbour (each block is one patch), scaled
to their own maximum for display and blended over the image; the last
pixel row and column of every tile are a dark separating line.
"""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw

from perceiver_jax import errors
from perceiver_jax.data import input_pipeline
from perceiver_jax.model import perceiver
from perceiver_jax.model import sharing
from perceiver_jax.tools import trained as trained_lib
from perceiver_jax.training import workdir as workdir_lib

TILE = 96  # Pixels per tile side.
HEADER = 16  # Height of the column-title strip.
_ALPHA = 0.65  # Weight of the heat map over the image.
_COLORMAP = 'inferno'
_BATCH = 64


def parse_iteration(spec, num_iterations):
  """'last', 'mean' or a 1-based iteration number, checked against the model."""
  spec = str(spec).strip().lower()
  if spec in ('last', 'mean'):
    return spec
  if spec.isdigit() and 1 <= int(spec) <= num_iterations:
    return int(spec)
  raise errors.InputError(
      f'--attention_iteration={spec!r} must be last, mean or an '
      f'iteration number from 1 to {num_iterations}.')


def cross_attention_maps(trained, images, iteration='last'):
  """Cross-attention maps and logits of raw uint8 images.

  Args:
    trained: a `trained.TrainedModel`.
    images: uint8 `[n, height, width, channels]` as the dataset stores them.
    iteration: 'last', 'mean' (over iterations) or a 1-based iteration.

  Returns:
    `(maps, logits)`: float32 `[n, latents, grid, grid]`, each latent's map
    summing to 1 over the `grid x grid` patches, and `[n, classes]`.
  """
  rows, cols = trained.model.input_grid
  count = trained.model.num_cross_attends
  iteration = parse_iteration(iteration, count)

  @jax.jit
  def run(params, images):
    logits, state = trained.model.apply(
        {'params': params}, trained.preprocess(images), train=False,
        mutable=['intermediates'])
    weights = sharing.cross_attention_weights(state['intermediates'])
    if len(weights) != count:
      raise ValueError(
          f'The model sowed {len(weights)} cross-attention weight arrays; '
          f'expected one per cross-attend ({count}).')
    if iteration == 'mean':
      chosen = jnp.mean(jnp.stack(weights), axis=0)
    else:
      chosen = weights[-1 if iteration == 'last' else iteration - 1]
    chosen = jnp.mean(chosen.astype(jnp.float32), axis=1)  # Over heads.
    return chosen, logits

  maps, logits = [], []
  for i in range(0, len(images), _BATCH):
    m, l = jax.device_get(run(trained.params, np.asarray(images[i:i + _BATCH])))
    maps.append(m)
    logits.append(l)
  maps = np.concatenate(maps)
  if maps.shape[-1] != rows * cols:
    raise ValueError(f'Cross-attention reads {maps.shape[-1]} inputs, not the '
                     f'{rows}x{cols} input grid; cannot draw it as an image.')
  return maps.reshape(maps.shape[:2] + (rows, cols)), np.concatenate(logits)


def latent_indices(num_latents, count):
  """`count` latents evenly spaced over `[0, num_latents)`, first and last."""
  count = max(0, min(count, num_latents))
  return sorted({int(round(x)) for x in np.linspace(0, num_latents - 1, count)})


def image_tile(image, tile):
  """The image as shown in its tile: RGB, bilinear to `tile` pixels."""
  image = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  return np.asarray(image.convert('RGB').resize(
      (tile, tile), Image.Resampling.BILINEAR), np.float32)


def _map_tile(attention, base, colormap):
  """A `[grid, grid]` map as a heat map blended over the image tile `base`."""
  tile = base.shape[0]
  scaled = attention / max(float(attention.max()), 1e-12)
  heat = (colormap(scaled)[..., :3] * 255).astype(np.uint8)
  heat = np.asarray(Image.fromarray(heat).resize(
      (tile, tile), Image.Resampling.NEAREST), np.float32)
  return (1 - _ALPHA) * base + _ALPHA * heat


def render(images, maps, latents, tile=TILE):
  """The grid PNG described in the module doc, as a PIL image.

  Args:
    images: uint8 `[n, height, width, channels]`.
    maps: `[n, num_latents, grid, grid]` from `cross_attention_maps`.
    latents: indices of the single latents to show.
    tile: tile side in pixels.

  Returns:
    RGB image of `(2 + len(latents)) * tile` by `HEADER + n * tile` pixels.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  colormap = matplotlib.colormaps[_COLORMAP]
  titles = ['image', f'mean of {maps.shape[1]}'] + [
      f'latent {i}' for i in latents]
  canvas = np.zeros((HEADER + len(images) * tile, len(titles) * tile, 3),
                    np.uint8)
  for row, (image, attention) in enumerate(zip(images, maps)):
    base = image_tile(image, tile)
    tiles = [base, _map_tile(attention.mean(axis=0), base, colormap)] + [
        _map_tile(attention[i], base, colormap) for i in latents]
    top = HEADER + row * tile
    for col, t in enumerate(tiles):
      t = np.clip(np.round(t), 0, 255).astype(np.uint8)
      t[-1, :] = t[:, -1] = 0  # A dark line between tiles.
      canvas[top:top + tile, col * tile:(col + 1) * tile] = t
  out = Image.fromarray(canvas)
  draw = ImageDraw.Draw(out)
  for col, title in enumerate(titles):
    draw.text((col * tile + 3, 2), title, fill=(255, 255, 255))
  return out


def first_test_examples(config, num_images):
  """The first `num_images` test examples, in the pipeline's order."""
  images, labels = [], []
  with input_pipeline.Pipeline(config, num_shards=1,
                               shard_indices=[0]) as pipeline:
    if not 0 < num_images <= pipeline.num_test_examples:
      raise errors.InputError(
          f'--num_images={num_images} must be between 1 and the '
          f'{pipeline.num_test_examples} test examples.')
    for batch in pipeline.eval_batches('test'):
      keep = batch['mask'] > 0
      images.append(batch['image'][keep])
      labels.append(batch['label'][keep])
      if sum(len(x) for x in images) >= num_images:
        break
  return (np.concatenate(images)[:num_images],
          np.concatenate(labels)[:num_images])


@dataclasses.dataclass(frozen=True)
class AttentionGrid:
  """What `run` wrote, for the caller and the tests."""
  path: str
  rows: int
  cols: int
  tile: int
  latents: tuple[int, ...]
  iteration: object  # 'last', 'mean' or a 1-based iteration.


def run(workdir, *, num_images, output=None, num_latents=4,
        iteration='last', tile=TILE, overrides=None):
  """`--mode=attention`: renders the maps of the first test images to a PNG."""
  if num_images <= 0:
    raise errors.InputError(f'--num_images={num_images} must be positive.')
  if tile < 8:
    raise errors.InputError(f'tile={tile} pixels is too small to show a map.')
  trained_lib.check_workdir(workdir)
  config = trained_lib.load_config(workdir, overrides)
  count = perceiver.create_model(config, 1).num_cross_attends
  iteration = parse_iteration(iteration, count)
  output = str(output or
               workdir_lib.path(workdir) / workdir_lib.ATTENTION_MAPS)
  images, labels = first_test_examples(config, num_images)
  trained = trained_lib.load(workdir, mesh=trained_lib.single_device_mesh(),
                             config=config)
  maps, logits = cross_attention_maps(trained, images, iteration)
  latents = latent_indices(maps.shape[1], num_latents)
  image = render(images, maps, latents, tile)
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  try:  # Local or gs://, atomically.
    workdir_lib.write(output, buffer.getvalue())
  except OSError as e:
    raise errors.InputError(f'Cannot write --output={output}: '
                            f'{e.strerror or e}.') from None
  which = {'last': f'the last cross-attend ({count})',
           'mean': f'the mean of all {count} cross-attends'}.get(
               iteration, f'cross-attend {iteration}')
  ema = ', EMA weights' if trained.uses_ema else ''
  print(f'Wrote {output}: cross-attention of {which}, averaged over heads, of '
        f'the {trained.checkpoint} checkpoint (step {trained.step}{ema}). '
        f'Rows: test examples 0-{len(images) - 1}; columns: image, mean over '
        f'{maps.shape[1]} latents, latents {", ".join(map(str, latents))}.')
  names = trained.class_names
  for row, (label, logit) in enumerate(zip(labels, logits)):
    print(f'  row {row + 1}: label {names[label]}, predicted '
          f'{names[int(np.argmax(logit))]}')
  return AttentionGrid(str(output), len(images), 2 + len(latents), tile,
                       tuple(latents), iteration)
