"""Train state, optimiser and the jitted train and eval steps.

Importable without tensorflow, so benchmarks and accelerator checks can run
where only JAX is installed. The steps take raw uint8 batches; normalisation
and augmentation run inside the step (see `augment.py`), keyed by
`fold_in(key(seed), step)`, so a run is reproducible from (seed, step) alone.
The recipe options beyond the seed (recipe.py, mixing.py, randaugment.py)
are static: off, they leave the seed's step exactly as it was.

Gradient accumulation (`grad_accum_steps=K`) splits each global batch into
K micro-batches inside the step and sums their gradients, so the optimiser
sees the mean gradient of the whole batch while only one micro-batch's
activations are alive at a time. Augmentation (RandAugment, the seed's flip
and zoom, MixUp / CutMix) runs on the whole batch first, so K changes only
the order in which the gradient is summed; each micro-batch draws its own
dropout masks. K=1 is the step without accumulation, unchanged.
"""

import functools
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from perceiver_jax import checks
from perceiver_jax import config_lib
from perceiver_jax.data import augment
from perceiver_jax.data import mixing
from perceiver_jax.data import randaugment
from perceiver_jax.training import recipe
from perceiver_jax.training import sharding as sharding_lib


# Field -> the seed's behaviour (one pass over the whole batch).
OPTION_DEFAULTS = {'grad_accum_steps': 1}
# The step's options, as the config takes them: every key and the example
# order derive from the seed; `grad_accum_steps` micro-batches per batch.
RULES = {'seed': checks.non_negative_int(example=0),
         'grad_accum_steps': checks.positive_int(example=4)}


def problems(values, field=str):
  """The batch must split into `grad_accum_steps` equal micro-batches."""
  batch, accum = values.get('batch_size'), values.get('grad_accum_steps')
  if not (checks.is_int(batch) and checks.is_int(accum) and batch > 0
          and accum > 0) or batch % accum == 0:
    return []
  divisor = max(d for d in range(1, min(accum, batch) + 1) if batch % d == 0)
  return [f'{field("batch_size")}={batch} must be a multiple of '
          f'{field("grad_accum_steps")}={accum}, so that every micro-batch '
          f'holds batch_size / grad_accum_steps examples; pass e.g. '
          f'--config.grad_accum_steps={divisor} or --config.batch_size='
          f'{-(-batch // accum) * accum}']


def grad_accum_steps(config):
  """`config.grad_accum_steps`, or 1 when the config predates it."""
  return config_lib.option(config, 'grad_accum_steps')


class TrainState(train_state.TrainState):
  """Flax TrainState; the optimiser carries the learning rate as a hyperparam.

  `ema_params` is the moving average of the weights when `config.ema_decay`
  is set (checkpointed with the rest, so resuming stays exact), else None.
  """
  ema_params: Any = None


def step_rngs(seed, step):
  """(augmentation, dropout) keys of one step: a pure function of seed, step."""
  rng = jax.random.fold_in(jax.random.key(seed), step)
  return jax.random.split(rng)


def _init_fn(config, model, image_shape):
  """The function that initialises the train state (parameters, optimiser)."""
  tx = recipe.create_optimizer(config)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)

  def init():
    params = model.init({'params': jax.random.key(config.seed)}, dummy,
                        train=False)['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             ema_params=recipe.initial_ema(config, params))

  return init


def _shapes_and_shardings(init, mesh, rules):
  abstract = jax.eval_shape(init)
  return abstract, sharding_lib.tree_shardings(abstract, mesh, rules)


def abstract_train_state(config, model, image_shape, mesh, rules=()):
  """`(state, shardings)`: the state's shapes and dtypes, nothing allocated.

  What a program can be lowered and compiled for without the memory its
  state takes (benchmarks/memory.py).
  """
  return _shapes_and_shardings(_init_fn(config, model, image_shape), mesh,
                               rules)


def create_train_state(config, model, image_shape, mesh, rules=()):
  """Initialises parameters and optimiser state directly in their shardings."""
  init = _init_fn(config, model, image_shape)
  _, shardings = _shapes_and_shardings(init, mesh, rules)
  return jax.jit(init, out_shardings=shardings)(), shardings


def _metric_sums(logits, labels, mask, losses=None):
  """Per-batch sums (not means), so partial and padded batches add up exactly.

  Any leading axes: `[batch]` labels, or `[K, batch / K]` micro-batches.
  `losses` defaults to the plain cross-entropy against `labels`.
  """
  if losses is None:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  k = min(5, logits.shape[-1])
  top_k = jax.lax.top_k(logits, k)[1]
  correct = top_k == labels[..., None]
  mask = mask.astype(jnp.float32)
  return {
      'loss': jnp.sum(losses * mask),
      'accuracy': jnp.sum(correct[..., 0] * mask),
      'top5_accuracy': jnp.sum(jnp.any(correct, axis=-1) * mask),
      'count': jnp.sum(mask),
  }


def set_learning_rate(state, learning_rate):
  """Returns `state` with the optimiser's injected learning rate replaced."""
  hyperparams = state.opt_state.hyperparams
  hyperparams = dict(hyperparams, learning_rate=jnp.asarray(
      learning_rate, hyperparams['learning_rate'].dtype))
  return state.replace(
      opt_state=state.opt_state._replace(hyperparams=hyperparams))


def augment_train(augment_key, batch, config, stats):
  """[RandAugment on the raw images ->] the seed's augmentation [-> mixing].

  Returns `(images, mix)`; `mix` is None unless MixUp / CutMix is on. The
  recipe options draw from keys folded out of `augment_key`, so the seed's own
  draws (flip, zoom) are the same whether they are on or not.
  """
  images = batch['image']
  num_ops = config_lib.option(config, 'randaugment_num_ops')
  if num_ops:
    images = randaugment.rand_augment(
        jax.random.fold_in(augment_key, 1), images, num_ops,
        config_lib.option(config, 'randaugment_magnitude'))
  if config_lib.option(config, 'device_augment') == 'seed':
    images = augment.preprocess_train(augment_key, images, stats['mean'],
                                      stats['variance'], config.image_size)
  else:  # The host cropped and flipped already (host_crop='inception').
    images = augment.preprocess_eval(images, stats['mean'],
                                     stats['variance'], config.image_size)
  mixup_alpha = config_lib.option(config, 'mixup_alpha')
  cutmix_alpha = config_lib.option(config, 'cutmix_alpha')
  if not (mixup_alpha or cutmix_alpha):
    return images, None
  return mixing.mix_batch(
      jax.random.fold_in(augment_key, 2), images, batch['label'],
      mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
      mix_prob=config_lib.option(config, 'mix_prob'))


def _batch_gradients(apply_fn, params, images, labels, mix, dropout_key,
                     config):
  """Gradient of the mean training loss over `images`; logits, losses."""

  def loss_fn(params):
    logits = apply_fn({'params': params}, images, train=True,
                      rngs={'dropout': dropout_key})
    losses = recipe.train_losses(config, logits, labels, mix)
    return jnp.mean(losses), (logits, losses)

  grads, (logits, losses) = jax.grad(loss_fn, has_aux=True)(params)
  return grads, logits, losses


def micro_batches(tree, accum):
  """`[B, ...]` leaves as `[B / K, K, ...]`: micro-batch k is rows k, k+K, ...

  A batch sharded over D devices gives each a contiguous block of B / D
  rows, and B / D is a multiple of K (`sharding.check_batch_size`), so this
  reshape keeps every row on its device and each block holds B / (K D) rows
  of every micro-batch: each micro-batch is spread over all D devices, as
  the batch is, without moving data. K contiguous micro-batches would
  instead each sit on D / K devices (or be moved between them).
  """
  return jax.tree.map(
      lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), tree)


def micro_batch(tree, index, sharding=None):
  """Micro-batch `index` of `micro_batches`' tree, placed as `sharding`."""
  def take(x):
    x = jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)
    return x if sharding is None else jax.lax.with_sharding_constraint(
        x, sharding)
  return jax.tree.map(take, tree)


def gradients(apply_fn, params, images, labels, mix, dropout_key, config,
              micro_sharding=None):
  """Gradient of the batch's mean training loss; the logits and losses.

  With `grad_accum_steps` K > 1, a `lax.scan` over K micro-batches
  (`micro_batches`) sums their gradients, then divides by K: the mean over
  the batch, as K=1 computes it, in another summation order. Micro-batch k
  draws its dropout masks from `fold_in(dropout_key, k)`: hash dropout
  derives masks from each element's index within the micro-batch, so
  without it every micro-batch would share one set of masks. MixUp's weight
  is one per batch; its partner labels are split like the labels.

  Returns:
    `(grads, logits, losses, labels)`; with K > 1 the last three are
    `[K, B / K, ...]`, in micro-batch order (the metric sums take either).
  """
  accum = grad_accum_steps(config)
  if accum == 1:
    grads, logits, losses = _batch_gradients(apply_fn, params, images, labels,
                                             mix, dropout_key, config)
    return grads, logits, losses, labels
  weight, partners = (None, None) if mix is None else mix
  split = micro_batches(
      {'images': images, 'labels': labels, 'partners': partners}, accum)

  def accumulate(grad_sum, index):
    part = micro_batch(split, index, micro_sharding)
    part_mix = None if mix is None else (weight, part['partners'])
    grads, logits, losses = _batch_gradients(
        apply_fn, params, part['images'], part['labels'], part_mix,
        jax.random.fold_in(dropout_key, index), config)
    return (jax.tree.map(jnp.add, grad_sum, grads),
            (logits, losses, part['labels']))

  grad_sum, (logits, losses, labels) = jax.lax.scan(
      accumulate, jax.tree.map(jnp.zeros_like, params), jnp.arange(accum))
  grads = jax.tree.map(lambda g: g / accum, grad_sum)
  return grads, logits, losses, labels


def train_step(state, batch, learning_rate, *, config, stats,
               micro_sharding=None):
  """One LAMB step on a global batch; returns the new state and metric sums.

  The reported loss is the training objective (smoothed and mixed targets
  when those are on); accuracies count against the batch's own labels,
  also when its images are mixed. `micro_sharding` places each micro-batch
  when `grad_accum_steps` > 1 (the batch's sharding: see `micro_batches`).
  """
  augment_key, dropout_key = step_rngs(config.seed, state.step)
  images, mix = augment_train(augment_key, batch, config, stats)
  grads, logits, losses, labels = gradients(
      state.apply_fn, state.params, images, batch['label'], mix, dropout_key,
      config, micro_sharding)
  state = set_learning_rate(state, learning_rate).apply_gradients(grads=grads)
  ema_decay = config_lib.option(config, 'ema_decay')
  if ema_decay:
    state = state.replace(ema_params=recipe.ema_update(
        state.ema_params, state.params, ema_decay))
  metrics = _metric_sums(logits, labels, jnp.ones_like(labels), losses)
  # Norms let the host stop a diverging run at the step it diverged.
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['param_norm'] = optax.global_norm(state.params)
  return state, metrics


def eval_step(state, batch, *, config, stats):
  """Metric sums over the real (mask 1) examples of a padded eval batch.

  Uses the EMA weights when they are kept (`recipe.eval_params`).
  """
  images = augment.preprocess_eval(batch['image'], stats['mean'],
                                   stats['variance'], config.image_size)
  logits = state.apply_fn({'params': recipe.eval_params(state)}, images,
                          train=False)
  return _metric_sums(logits, batch['label'], batch['mask'])


def jit_steps(config, stats, mesh, state_shardings):
  """Jitted, sharded train and eval steps; the train step donates its state."""
  stats = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), stats)
  batch = sharding_lib.data_sharding(mesh)
  repl = sharding_lib.replicated(mesh)
  train = jax.jit(
      functools.partial(train_step, config=config, stats=stats,
                        micro_sharding=batch),
      in_shardings=(state_shardings, batch, repl),
      out_shardings=(state_shardings, repl),
      donate_argnums=(0,))
  evaluate = jax.jit(
      functools.partial(eval_step, config=config, stats=stats),
      in_shardings=(state_shardings, batch), out_shardings=repl)
  return train, evaluate


def count_params(params):
  return sum(x.size for x in jax.tree.leaves(params))

