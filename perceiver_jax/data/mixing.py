"""MixUp and CutMix as pure, jit-able functions of a PRNG key.

As in timm's `Mixup` (batch mode): one mixing weight per batch, each image
mixed with its mirror in the batch (`images[::-1]`), MixUp or CutMix chosen
with p = 0.5 when both are enabled, and nothing mixed with probability
`1 - mix_prob`. The train step calls `mix_batch` after the seed's
augmentation and turns `(weight, partner_labels)` into soft targets
(`recipe.train_losses`). Flipping a global batch is a fixed permutation, so
the result does not depend on how the batch is sharded.
"""

import jax
import jax.numpy as jnp


def mixup(images, weight):
  """`weight * images + (1 - weight) * images[::-1]`."""
  return weight * images + (1.0 - weight) * images[::-1]


def cutmix_box(rng, height, width, weight):
  """A box covering about `1 - weight` of the image, as timm's `rand_bbox`.

  Args:
    rng: PRNG key for the box centre.
    height: static image height.
    width: static image width.
    weight: the drawn mixing weight (scalar).

  Returns:
    `(box, adjusted_weight)`: a `[height, width]` bool mask of the pasted
    box (clipped at the image border) and `1 - box area / image area`, the
    weight the labels must use.
  """
  cut = jnp.sqrt(1.0 - weight)
  cut_h = (height * cut).astype(jnp.int32)
  cut_w = (width * cut).astype(jnp.int32)
  cy_rng, cx_rng = jax.random.split(rng)
  cy = jax.random.randint(cy_rng, (), 0, height)
  cx = jax.random.randint(cx_rng, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0,
                                                           height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0,
                                                          width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  return box, 1.0 - area / (height * width)


def cutmix(rng, images, weight):
  """Pastes a box of each image's partner; returns `(images, label_weight)`."""
  box, weight = cutmix_box(rng, images.shape[1], images.shape[2], weight)
  return jnp.where(box[None, :, :, None], images[::-1], images), weight


def mix_batch(rng, images, labels, *, mixup_alpha, cutmix_alpha, mix_prob):
  """Mixes a batch; returns `(images, (weight, partner_labels))`.

  The targets are `weight * onehot(labels) + (1 - weight) *
  onehot(partner_labels)`. Unmixed batches (probability `1 - mix_prob`)
  come back unchanged with weight 1.

  Args:
    rng: PRNG key.
    images: `[B, H, W, C]` float images.
    labels: `[B]` int labels.
    mixup_alpha: Beta(alpha, alpha) parameter of MixUp; 0 disables it.
    cutmix_alpha: Beta(alpha, alpha) parameter of CutMix; 0 disables it.
    mix_prob: probability of mixing a batch at all.
  """
  apply_rng, choice_rng, mixup_rng, cutmix_rng, box_rng = jax.random.split(
      rng, 5)
  partner_labels = labels[::-1]
  mixed_images, weight = images, jnp.float32(1.0)
  if mixup_alpha > 0:
    mixup_weight = jax.random.beta(mixup_rng, mixup_alpha, mixup_alpha)
    mixed_images, weight = mixup(images, mixup_weight), mixup_weight
  if cutmix_alpha > 0:
    cut_weight = jax.random.beta(cutmix_rng, cutmix_alpha, cutmix_alpha)
    cut_images, cut_weight = cutmix(box_rng, images, cut_weight)
    if mixup_alpha > 0:
      use_cutmix = jax.random.bernoulli(choice_rng, 0.5)
      mixed_images = jnp.where(use_cutmix, cut_images, mixed_images)
      weight = jnp.where(use_cutmix, cut_weight, weight)
    else:
      mixed_images, weight = cut_images, cut_weight
  apply = jax.random.bernoulli(apply_rng, mix_prob)
  images = jnp.where(apply, mixed_images, images)
  weight = jnp.where(apply, weight, 1.0).astype(jnp.float32)
  return images, (weight, partner_labels)
