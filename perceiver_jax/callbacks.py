"""End-of-epoch controllers with Keras semantics, as small pure functions.

`ReduceLROnPlateau` and `EarlyStopping` are reproduced exactly (Keras 2.7 /
Keras 3, `mode='min'` on `val_loss`) so the seed's learning-rate history can
be replayed. Their state is a frozen dataclass that serialises to JSON, so it
goes into every checkpoint and a resumed run makes the same decisions.
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class PlateauState:
  """State of ReduceLROnPlateau: best monitored value, epochs waited, lr."""
  learning_rate: float
  best: float = math.inf
  wait: int = 0
  cooldown_counter: int = 0


def plateau_init(learning_rate):
  return PlateauState(learning_rate=float(learning_rate))


def plateau_update(state, value, *, factor, patience, min_delta=1e-4,
                   cooldown=0, min_lr=0.0):
  """Keras `ReduceLROnPlateau.on_epoch_end` for a quantity to minimise.

  An improvement is `value < best - min_delta`; after `patience` epochs
  without one the learning rate is multiplied by `factor` (not below
  `min_lr`) and the wait restarts, after `cooldown` epochs of rest.
  """
  if not 0.0 < factor < 1.0:
    raise ValueError(f'plateau factor must be in (0, 1), got {factor}.')
  best, wait, cooldown_counter = state.best, state.wait, state.cooldown_counter
  lr = state.learning_rate
  in_cooldown = cooldown_counter > 0
  if in_cooldown:
    cooldown_counter -= 1
    wait = 0
  if value < best - min_delta:
    best, wait = value, 0
  elif not in_cooldown:
    wait += 1
    if wait >= patience and lr > min_lr:
      lr = max(lr * factor, min_lr)
      cooldown_counter, wait = cooldown, 0
  return PlateauState(learning_rate=lr, best=best, wait=wait,
                      cooldown_counter=cooldown_counter)


@dataclasses.dataclass(frozen=True)
class EarlyStoppingState:
  """State of EarlyStopping; epochs are 1-based, 0 means none yet."""
  best: float = math.inf
  best_epoch: int = 0
  wait: int = 0
  stopped_epoch: int = 0

  @property
  def should_stop(self):
    return self.stopped_epoch > 0


def early_stopping_update(state, value, epoch, *, patience, min_delta=0.0):
  """Keras `EarlyStopping.on_epoch_end` for a quantity to minimise.

  `epoch` is 1-based. The wait grows every epoch and resets on an
  improvement (`value < best - min_delta`); training stops once the wait
  reaches `patience`. Keras never stops after the first epoch.
  """
  wait = state.wait + 1
  best, best_epoch = state.best, state.best_epoch
  if value < best - min_delta:
    best, best_epoch, wait = value, epoch, 0
  stopped_epoch = state.stopped_epoch
  if wait >= patience and epoch > 1:
    stopped_epoch = epoch
  return EarlyStoppingState(best=best, best_epoch=best_epoch, wait=wait,
                            stopped_epoch=stopped_epoch)


def to_dict(state):
  """JSON-friendly dict; infinities become strings so JSON stays standard."""
  return {k: (repr(v) if isinstance(v, float) and math.isinf(v) else v)
          for k, v in dataclasses.asdict(state).items()}


def from_dict(cls, d):
  return cls(**{k: (float(v) if isinstance(v, str) else v)
                for k, v in d.items()})
