"""End-of-epoch controllers with Keras 3 semantics, as small pure functions.

`ReduceLROnPlateau` and `EarlyStopping` with `mode='min'` reproduce Keras
3's (`keras/src/callbacks/`) decision for decision, so the seed's
learning-rate history can be replayed and a run makes the choices the Keras
example would. tests/test_callbacks.py checks this against the real Keras
callbacks, epoch by epoch.

Keras' arithmetic is emulated, not just its control flow, because near-ties
are decided by it:
  * The first value is always an improvement (`best` starts as None); after
    that a value is one when `value + |min_delta| < best`, where the sum is
    taken in float64 but `keras.ops.less` compares in float32 (it converts
    Python floats to float32 tensors). So values within float32 rounding of
    the best (e.g. 1e-9 below it) are not improvements.
  * The learning rate lives in the optimizer as a float32 variable. A cut
    reads that float32 value, happens only if it exceeds `float32(min_lr)`,
    and stores `max(lr * factor, min_lr)` rounded to float32 again. So the
    rate ends at `float32(min_lr)`, and the number of cuts to get there can
    differ from exact arithmetic: from 1e-3 with factor 0.1 and min_lr 1e-4
    it takes two, as float32(1e-3) * 0.1 rounds to just above 1e-4.
  * ReduceLROnPlateau asks whether it is in cooldown again after counting
    the cooldown down, so the epoch that ends a cooldown already counts
    towards patience. EarlyStopping never stops on an improving epoch, nor
    after the first epoch.
Keras 2.7 (which the seed's Keras example ran) differs in two of these: its
`best` starts at inf and is compared with NumPy on the values as given
(ReduceLROnPlateau as `value < best - min_delta`), and its EarlyStopping
checks the patience even after an improvement, so with patience 0 it stops
on an improving epoch (its cooldown handling is the same as Keras 3's).

States are frozen dataclasses that serialise to standard JSON, so they go
into every checkpoint and a resumed run makes the same decisions.
"""

import dataclasses
import math
from typing import Optional

import numpy as np

from perceiver_jax import checks

_NON_NEGATIVE = checks.number(0.0, requirement='a non-negative number',
                              example=0.0)
# The controllers' options, as the config takes them.
RULES = {
    'plateau.factor': checks.number(0.0, 1.0, low_open=True, high_open=True,
                                    requirement='in (0, 1)', example=0.2),
    'plateau.patience': checks.non_negative_int(example=3),
    'plateau.cooldown': checks.non_negative_int(),
    'plateau.min_delta': _NON_NEGATIVE,
    'plateau.min_lr': _NON_NEGATIVE,
    'early_stopping.patience': checks.non_negative_int(example=15),
    'early_stopping.min_delta': _NON_NEGATIVE,
    'early_stopping.restore_best_weights': checks.BOOL,
}


def _f32(x):
  """`x` rounded to float32, as Keras' tensors and variables hold it.

  Values beyond float32's range become infinities here; Keras' conversion
  rejects them instead.
  """
  with np.errstate(over='ignore'):
    return np.float32(x)


def _is_improvement(value, best, min_delta):
  """Keras' `MonitorCallback._is_improvement` in 'min' mode."""
  if best is None:
    return True
  return bool(_f32(value + abs(min_delta)) < _f32(best))


@dataclasses.dataclass(frozen=True)
class PlateauState:
  """State of ReduceLROnPlateau: best monitored value, epochs waited, lr.

  `best` is None until the first value. `learning_rate` is the rate in
  force; the optimizer holds it as float32 (the initial rate is kept as
  configured, every cut yields a float32 value).
  """
  learning_rate: float
  best: Optional[float] = None
  wait: int = 0
  cooldown_counter: int = 0


def plateau_init(learning_rate):
  return PlateauState(learning_rate=float(learning_rate))


def plateau_update(state, value, *, factor, patience, min_delta=1e-4,
                   cooldown=0, min_lr=0.0):
  """Keras `ReduceLROnPlateau.on_epoch_end` for a quantity to minimise.

  After `patience` epochs without an improvement the learning rate is
  multiplied by `factor` (not below `min_lr`), the wait restarts, and
  `cooldown` epochs follow in which the wait is held at 0. The counter is
  decremented before the improvement test and in-cooldown is judged after
  it, as Keras does, so the last cooldown epoch already counts.
  """
  factor_rule = RULES['plateau.factor']
  if not factor_rule.ok(factor):
    raise ValueError(f'plateau factor must be {factor_rule.requirement}, got '
                     f'{factor}.')
  value = float(value)  # Keras' CallbackList turns logs into Python floats.
  best, wait, cooldown_counter = state.best, state.wait, state.cooldown_counter
  lr = state.learning_rate
  if cooldown_counter > 0:
    cooldown_counter -= 1
    wait = 0
  if _is_improvement(value, best, min_delta):
    best, wait = value, 0
  elif cooldown_counter == 0:
    wait += 1
    if wait >= patience:
      old_lr = _f32(lr)  # What `float(optimizer.learning_rate)` reads.
      if old_lr > _f32(min_lr):
        lr = float(_f32(max(float(old_lr) * factor, min_lr)))
        cooldown_counter, wait = cooldown, 0
  return PlateauState(learning_rate=lr, best=best, wait=wait,
                      cooldown_counter=cooldown_counter)


@dataclasses.dataclass(frozen=True)
class EarlyStoppingState:
  """State of EarlyStopping; epochs are 1-based, 0 means none yet.

  `best` is None until the first value.
  """
  best: Optional[float] = None
  best_epoch: int = 0
  wait: int = 0
  stopped_epoch: int = 0

  @property
  def should_stop(self):
    return self.stopped_epoch > 0


def early_stopping_update(state, value, epoch, *, patience, min_delta=0.0):
  """Keras `EarlyStopping.on_epoch_end` for a quantity to minimise.

  `epoch` is 1-based. The wait grows every epoch and an improvement resets
  it and returns at once, so an improving epoch never stops training, even
  with patience 0. Otherwise training stops once the wait reaches
  `patience`, but never after the first epoch (Keras' `epoch > 0`).
  """
  value = float(value)  # Keras' CallbackList turns logs into Python floats.
  if _is_improvement(value, state.best, min_delta):
    return dataclasses.replace(state, best=value, best_epoch=epoch, wait=0)
  wait = state.wait + 1
  stopped_epoch = state.stopped_epoch
  if wait >= patience and epoch > 1:
    stopped_epoch = epoch
  return dataclasses.replace(state, wait=wait, stopped_epoch=stopped_epoch)


def _encode(v):
  if isinstance(v, float) and not math.isfinite(v):
    return 'NaN' if math.isnan(v) else ('Infinity' if v > 0 else '-Infinity')
  return v


def to_dict(state):
  """Dict for standard JSON (no bare Infinity/NaN).

  A `best` of None (no value yet) becomes null; non-finite floats become
  the strings 'Infinity', '-Infinity' or 'NaN', spelt unlike the 'inf'
  that states written before best could be None hold for "no value yet".
  """
  return {k: _encode(v) for k, v in dataclasses.asdict(state).items()}


def from_dict(cls, d):
  """Inverse of `to_dict`; also reads states from before best could be None.

  Those wrote `best` as the string 'inf' until a value improved on it,
  which is what None means now, so 'inf' there reads as None.
  """
  def decode(k, v):
    if k == 'best' and v == 'inf':
      return None
    return float(v) if isinstance(v, str) else v
  return cls(**{k: decode(k, v) for k, v in d.items()})
