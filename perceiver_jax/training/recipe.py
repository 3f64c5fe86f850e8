"""Training-recipe options beyond the seed: schedule, optimiser, loss, EMA.

Every option is a config field whose default reproduces the seed exactly
(see configs/cifar100.py); `OPTION_DEFAULTS` lists them, and a config that
lacks a field gets its default, so older configs keep working. Importable
without tensorflow, like steps.py.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from perceiver_jax import checks
from perceiver_jax import config_lib
from perceiver_jax.model import encoders

# Field -> the seed's behaviour.
OPTION_DEFAULTS = {
    'lr_schedule': 'plateau',
    'warmup_epochs': 0,
    'min_learning_rate': 0.0,
    'lr_decay_epochs': (),
    'lr_decay_factor': 0.1,
    'label_smoothing': 0.0,
    'weight_decay_mask': 'all',
    'grad_clip_norm': 0.0,
    'mixup_alpha': 0.0,
    'cutmix_alpha': 0.0,
    'mix_prob': 1.0,
    'randaugment_num_ops': 0,
    'randaugment_magnitude': 9.0,
    'ema_decay': 0.0,
    'optimizer': 'lamb',
    'momentum': 0.9,
}


# 'lamb' (the seed's and the Perceiver paper's), or what fine-tuning
# codebases use: 'sgd' (with `momentum`, big_vision's transfer recipe) or
# 'adamw' (decoupled weight decay).
OPTIMIZERS = ('lamb', 'sgd', 'adamw')
# 'plateau' (the seed's controller), 'warmup_cosine', or 'step': divided by
# 1 / lr_decay_factor at each of lr_decay_epochs (the Perceiver paper's).
LR_SCHEDULES = ('plateau', 'warmup_cosine', 'step')
_NON_NEGATIVE_OFF = checks.number(
    0.0, requirement='a non-negative number (0: off)', example=1.0)
# The recipe's options, as the config takes them.
RULES = {
    'num_epochs': checks.positive_int(example=50),
    'learning_rate': checks.number(0.0, low_open=True,
                                   requirement='a positive number',
                                   example=0.001),
    'weight_decay': checks.number(0.0, requirement='a non-negative number',
                                  example=0.0001),
    'lr_schedule': checks.one_of(*LR_SCHEDULES),
    'warmup_epochs': checks.non_negative_int(example=5),
    'min_learning_rate': checks.number(
        0.0, requirement='a number in [0, learning_rate]', example=0.0),
    'lr_decay_epochs': checks.Rule(
        lambda v: isinstance(v, (tuple, list)) and all(
            checks.is_int(e) and e > 0 for e in v) and all(
                a < b for a, b in zip(v[:-1], v[1:])),
        'increasing positive integers (epochs)', (84, 102, 114)),
    'lr_decay_factor': checks.number(0.0, 1.0, low_open=True,
                                     requirement='in (0, 1]', example=0.1),
    'label_smoothing': checks.number(0.0, 1.0, high_open=True,
                                     requirement='in [0, 1)', example=0.1),
    'weight_decay_mask': checks.one_of('all', 'kernels'),
    'grad_clip_norm': _NON_NEGATIVE_OFF,
    'mixup_alpha': _NON_NEGATIVE_OFF,
    'cutmix_alpha': _NON_NEGATIVE_OFF,
    'mix_prob': checks.number(0.0, 1.0, requirement='in [0, 1]',
                              example=1.0),
    'randaugment_num_ops': checks.Rule(
        lambda v: checks.is_int(v) and 0 <= v <= 10,
        'an integer in [0, 10] (0: off)', 2),
    'randaugment_magnitude': checks.number(
        0.0, 10.0, requirement="in [0, 10] (timm's scale)", example=9),
    'ema_decay': checks.number(0.0, 1.0, high_open=True,
                               requirement='in [0, 1) (0: off)',
                               example=0.9998),
    'optimizer': checks.one_of(*OPTIMIZERS),
    'momentum': checks.number(0.0, 1.0, high_open=True,
                              requirement="in [0, 1) (optimizer='sgd')",
                              example=0.9),
}


def problems(values, field=str):
  """What is wrong across the recipe's options (`values`), as messages."""
  out = []
  warmup, epochs = values.get('warmup_epochs'), values.get('num_epochs')
  schedule = values.get('lr_schedule')
  if (schedule in ('warmup_cosine', 'step') and checks.is_int(warmup)
      and checks.is_int(epochs) and warmup >= epochs):
    out.append(f'{field("warmup_epochs")}={warmup} must be smaller than '
               f'{field("num_epochs")}={epochs} with lr_schedule='
               f"'{schedule}'; pass e.g. --config.warmup_epochs="
               f'{max(epochs // 10, 0)}')
  low, lr = values.get('min_learning_rate'), values.get('learning_rate')
  if (checks.is_number(low) and checks.is_number(lr) and lr > 0
      and low > lr):
    out.append(f'{field("min_learning_rate")}={low!r} must be a number in '
               '[0, learning_rate]; pass e.g. --config.min_learning_rate=0.0')
  return out


# --------------------------------------------------------------------------
# Learning rate.


class LearningRates:
  """The learning rate of every step, decided on the host.

  'plateau' (the seed): the ReduceLROnPlateau controller's current value.
  'warmup_cosine': `optax.warmup_cosine_decay_schedule` of the global step.
  'step': `learning_rate` times `lr_decay_factor` once for each of
  `lr_decay_epochs` reached (the Perceiver paper's ImageNet schedule),
  after a linear warm-up from 0 over `warmup_epochs` if any. Decays at or
  after `num_epochs` never happen (a run cut short: fine-tuning, a smoke
  run, fewer epochs on resume); they are logged, not refused. A schedule is
  tabulated once, so a resumed run gets bit-identical rates and the plateau
  controller is not consulted. Either way the rate reaches the step as a
  float and is injected into the optimiser state (`steps.set_learning_rate`).
  """

  def __init__(self, config, steps_per_epoch):
    self.steps_per_epoch = steps_per_epoch
    self.uses_plateau = config_lib.option(config, 'lr_schedule') == 'plateau'
    self.table = None
    if self.uses_plateau:
      return
    total = config.num_epochs * steps_per_epoch
    warmup_steps = config_lib.option(config, 'warmup_epochs') * steps_per_epoch
    if config_lib.option(config, 'lr_schedule') == 'warmup_cosine':
      schedule = optax.warmup_cosine_decay_schedule(
          init_value=0.0, peak_value=config.learning_rate,
          warmup_steps=warmup_steps, decay_steps=total,
          end_value=config_lib.option(config, 'min_learning_rate'))
      self.table = np.asarray(schedule(np.arange(total)), np.float32)
      return
    steps = np.arange(total)
    decay_epochs = config_lib.option(config, 'lr_decay_epochs')
    late = [e for e in decay_epochs if e >= config.num_epochs]
    if late:
      logging.warning('lr_decay_epochs %s: no decay at %s, at or after the '
                      'end of num_epochs=%d.', tuple(decay_epochs), late,
                      config.num_epochs)
    boundaries = np.asarray(decay_epochs, np.int64) * steps_per_epoch
    decays = np.searchsorted(boundaries, steps, side='right')
    rates = config.learning_rate * np.power(
        float(config_lib.option(config, 'lr_decay_factor')), decays, dtype=np.float64)
    if warmup_steps:
      rates *= np.minimum(steps / warmup_steps, 1.0)
    self.table = rates.astype(np.float32)

  def at(self, step, plateau_lr):
    """Rate of the schedule's step `step` (0-based: epoch * steps_per_epoch
    + the step within the epoch)."""
    if self.uses_plateau:
      return plateau_lr
    return float(self.table[min(step, len(self.table) - 1)])

  def of_epoch(self, epoch, plateau_lr):
    """Rate logged for 0-based `epoch`: its steps' mean (constant: the rate)."""
    if self.uses_plateau:
      return plateau_lr
    spe = self.steps_per_epoch
    return float(np.mean(self.table[epoch * spe:(epoch + 1) * spe],
                         dtype=np.float64))


# --------------------------------------------------------------------------
# Optimiser.


def decay_mask(params):
  """Leaves that decay under `weight_decay_mask='kernels'` (True) or not.

  Only Dense kernels (named 'kernel', at least 2-D) decay. Biases, LayerNorm
  scales and offsets, the learned attention scale, position embeddings, the
  latent array and learned queries do not: shrinking them towards zero is
  not a useful prior (timm's and BERT's convention).
  """
  def decays(path, leaf):
    name = getattr(path[-1], 'key', getattr(path[-1], 'name', None))
    return name == 'kernel' and len(leaf.shape) >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def _optimizer(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0,
               weight_decay=1e-4, optimizer='lamb', momentum=0.9, mask=None,
               grad_clip_norm=0.0, frozen=None):
  """The `optimizer`'s update rule, optionally after clipping.

  The moment arguments are `optax.lamb`'s, with its defaults, so the
  injected hyperparameters (and so the optimiser state of every checkpoint)
  are the seed's `inject_hyperparams(optax.lamb)`'s whatever the optimiser.
  'lamb' is `optax.lamb` (the seed's). 'adamw' is `optax.adamw` (decoupled
  weight decay, as LAMB's; `create_optimizer` passes its `eps`, 1e-8).
  'sgd' is SGD with `momentum`, `weight_decay * params` added to the
  gradient first (PyTorch's `SGD(weight_decay=...)`). Weight decay applies
  to `mask`'s leaves (all when None). `frozen`: None,
  or a function of the params marking (True) the leaves that never change:
  their updates are zero, so neither the optimiser nor weight decay
  touches them, and the clipping norm leaves them out.
  """
  if optimizer == 'lamb':
    tx = optax.lamb(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                    weight_decay=weight_decay, mask=mask)
  elif optimizer == 'adamw':
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                     weight_decay=weight_decay, mask=mask)
  else:
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask),
                     optax.sgd(learning_rate, momentum=momentum or None))
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  if frozen is not None:
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        lambda params: jax.tree.map(lambda f: 'frozen' if f else 'train',
                                    frozen(params)))
  return tx


def create_optimizer(config):
  """LAMB as in the seed (or `config.optimizer`), plus the optional decay
  mask and gradient clipping.

  `inject_hyperparams` keeps the learning rate and weight decay in the
  optimiser state, where the host sets the rate each step and every
  checkpoint saves it. With the defaults this is
  `inject_hyperparams(optax.lamb)` exactly: the same state tree and the
  same numerics as the seed's path. A model with frozen parameters (the
  conv stem's BatchNorm statistics, `encoders.frozen_mask`) gets zero
  updates for them.
  """
  mask = decay_mask if config_lib.option(config, 'weight_decay_mask') == 'kernels' else (
      None)
  frozen = encoders.frozen_mask if encoders.has_frozen_parameters(
      config_lib.option(config, 'preprocessor')) else None
  optimizer = config_lib.option(config, 'optimizer')
  return optax.inject_hyperparams(
      _optimizer, static_args=('optimizer', 'momentum', 'mask',
                               'grad_clip_norm', 'frozen'))(
          learning_rate=config.learning_rate,
          eps=1e-8 if optimizer == 'adamw' else 1e-6,
          weight_decay=config.weight_decay, optimizer=optimizer,
          momentum=float(config_lib.option(config, 'momentum')), mask=mask,
          grad_clip_norm=float(config_lib.option(config, 'grad_clip_norm')),
          frozen=frozen)


# --------------------------------------------------------------------------
# Loss.


def uses_soft_targets(config):
  return bool(config_lib.option(config, 'label_smoothing') or
              config_lib.option(config, 'mixup_alpha') or config_lib.option(config, 'cutmix_alpha'))


def train_losses(config, logits, labels, mix=None):
  """Per-example training loss.

  The seed's integer-label cross-entropy unless label smoothing or MixUp /
  CutMix is on; then cross-entropy against soft targets: each example's
  smoothed one-hot label, mixed with its partner's by `mix` (see
  `mixing.mix_batch`). Evaluation always uses the plain cross-entropy.
  """
  if not uses_soft_targets(config):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  num_classes = logits.shape[-1]
  smooth = lambda y: optax.smooth_labels(
      jax.nn.one_hot(y, num_classes, dtype=jnp.float32),
      config_lib.option(config, 'label_smoothing'))
  targets = smooth(labels)
  if mix is not None:
    weight, partner_labels = mix
    targets = weight * targets + (1.0 - weight) * smooth(partner_labels)
  return optax.softmax_cross_entropy(logits, targets)


# --------------------------------------------------------------------------
# Exponential moving average of the weights.


def ema_update(ema_params, params, decay):
  """`decay * ema + (1 - decay) * params`, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                      ema_params, params)


def initial_ema(config, params):
  """EMA params start as the initial params; None (no leaves) when off."""
  return params if config_lib.option(config, 'ema_decay') > 0 else None


def eval_params(state):
  """The weights validation and test use: the EMA's when it is kept."""
  return state.params if state.ema_params is None else state.ema_params
