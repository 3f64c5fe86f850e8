"""ReduceLROnPlateau and EarlyStopping: hand-worked sequences, the seed's
log, and epoch-by-epoch agreement with the real Keras 3 callbacks."""

import itertools
import json

import keras
import numpy as np
import pytest

from perceiver_jax.training import callbacks

# val_loss of epochs 1..45 in the seed's own training log.
SEED_VAL_LOSS = (
    4.0544, 3.7379, 3.4527, 3.2160, 2.9947, 2.9179, 2.7958, 2.7117, 2.5933,
    2.5030, 2.4657, 2.4441, 2.3508, 2.3219, 2.2748, 2.2364, 2.1684, 2.1614,
    2.1595, 2.1187, 2.1095, 2.0997, 2.0662, 2.0564, 2.0793, 2.0835, 2.0790,
    1.8846, 1.8844, 1.8792, 1.8938, 1.9055, 1.9064, 1.8912, 1.8963, 1.8998,
    1.8941, 1.8946, 1.8923, 1.8934, 1.8938, 1.8938, 1.8939, 1.8938, 1.8940)

SEED_PLATEAU = dict(factor=0.2, patience=3, min_delta=1e-4, cooldown=0,
                    min_lr=0.0)


def _lr_history(values, lr=1e-3, **kwargs):
  """Learning rate in force for the epoch after each value."""
  state = callbacks.plateau_init(lr)
  lrs = []
  for v in values:
    state = callbacks.plateau_update(state, v, **kwargs)
    lrs.append(state.learning_rate)
  return lrs


def test_plateau_on_seed_log_reduces_after_epoch_27():
  lrs = _lr_history(SEED_VAL_LOSS, **SEED_PLATEAU)
  # Epochs 25-27 fail to beat epoch 24's 2.0564, so the LR used from epoch
  # 28 on is 2e-4: the jump in the seed's log. Epoch 29 (1.8844) beats
  # 1.8846 by more than min_delta; the best stays at epoch 30 (1.8792) and
  # every third epoch after it cuts the LR again.
  reductions = [i + 1 for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1]]
  assert lrs[:26] == [1e-3] * 26
  assert reductions == [27, 33, 36, 39, 42, 45]
  assert lrs[26] == pytest.approx(2e-4)
  assert lrs[-1] == pytest.approx(1e-3 * 0.2**6)


def _f32(values):
  """As the optimizer holds them: Keras stores the rate as float32."""
  return np.float32(values).tolist()


def test_plateau_min_delta_is_absolute():
  # 0.99995 is not an improvement over 1.0 with min_delta 1e-4.
  lrs = _lr_history([1.0, 0.99995, 0.99995, 0.99995], factor=0.5,
                    patience=3, min_delta=1e-4)
  assert _f32(lrs) == _f32([1.0e-3, 1.0e-3, 1.0e-3, 0.5e-3])
  lrs = _lr_history([1.0, 0.9998, 0.9996, 0.9994], factor=0.5,
                    patience=3, min_delta=1e-4)
  assert lrs == [1e-3] * 4


def test_plateau_cooldown_and_min_lr():
  flat = [1.0] * 8
  # patience 2, cooldown 1: reduce after epoch 3. Epoch 4 counts the
  # cooldown down to 0 and Keras then asks `in_cooldown()` again, so epoch 4
  # already counts towards patience (wait 1) and epoch 5 reduces again; and
  # so on every second epoch. This is the sequence Keras 3.15's
  # ReduceLROnPlateau produces (test_plateau_matches_keras drives it).
  lrs = _lr_history(flat, lr=1.0, factor=0.5, patience=2, cooldown=1)
  assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
  # min_lr floors the reduction and then stops further ones.
  lrs = _lr_history(flat, lr=1.0, factor=0.1, patience=1, min_lr=0.05)
  assert _f32(lrs) == _f32([1.0, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])


def test_plateau_rejects_bad_factor():
  with pytest.raises(ValueError, match='factor'):
    callbacks.plateau_update(callbacks.plateau_init(1.0), 1.0, factor=1.5,
                             patience=1)


def _early_stop(values, **kwargs):
  state = callbacks.EarlyStoppingState()
  for epoch, v in enumerate(values, start=1):
    state = callbacks.early_stopping_update(state, v, epoch, **kwargs)
    if state.should_stop:
      break
  return state


def test_early_stopping_on_seed_log_stops_after_epoch_45():
  state = _early_stop(SEED_VAL_LOSS, patience=15)
  assert state.stopped_epoch == 45
  assert state.best_epoch == 30
  assert state.best == 1.8792
  # One epoch less and it keeps going.
  assert not _early_stop(SEED_VAL_LOSS[:44], patience=15).should_stop


def test_early_stopping_min_delta_and_first_epoch():
  # Patience 1 never stops after the first epoch (Keras' `epoch > 0`).
  assert not _early_stop([1.0], patience=1).should_stop
  assert _early_stop([1.0, 1.0], patience=1).stopped_epoch == 2
  # Improvements smaller than min_delta do not reset the wait.
  state = _early_stop([1.0, 0.95, 0.92, 0.91], patience=3, min_delta=0.1)
  assert state.stopped_epoch == 4 and state.best_epoch == 1
  state = _early_stop([1.0, 0.95, 0.92, 0.91], patience=3)
  assert not state.should_stop and state.best_epoch == 4


def test_early_stopping_patience_0_never_stops_on_an_improvement():
  # Keras returns right after an improvement, before the patience check.
  state = _early_stop([1.0, 0.9, 0.8, 0.8, 0.7], patience=0)
  assert state.stopped_epoch == 4 and state.best_epoch == 3


def test_near_ties_are_decided_in_float32():
  # keras.ops.less compares float32: 1e-9 below the best rounds to the best.
  state = _early_stop([1.0, 1.0 - 1e-9], patience=1)
  assert state.stopped_epoch == 2 and state.best_epoch == 1
  # One float32 step below 1.0 is an improvement.
  below = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
  state = _early_stop([1.0, below], patience=1)
  assert not state.should_stop and state.best_epoch == 2
  # value + min_delta is 1e-9 below the best: a float32 tie, so no
  # improvement, and patience 1 cuts the rate.
  lrs = _lr_history([1.0, 1.0 - 1e-4 - 1e-9], factor=0.5, patience=1,
                    min_delta=1e-4)
  assert _f32(lrs) == _f32([1e-3, 0.5e-3])


def test_plateau_reaches_min_lr_as_float32():
  # float32(1e-3) * 0.1 stored as float32 is above float32(1e-4), so Keras
  # cuts a second time, to min_lr, and then never again.
  state = callbacks.plateau_init(1e-3)
  lrs, waits = [], []
  for v in [1.0] * 5:
    state = callbacks.plateau_update(state, v, factor=0.1, patience=1,
                                     min_lr=1e-4)
    lrs.append(state.learning_rate)
    waits.append(state.wait)
  assert lrs == [1e-3, float(np.float32(np.float32(1e-3) * 0.1)),
                 float(np.float32(1e-4)), float(np.float32(1e-4)),
                 float(np.float32(1e-4))]
  # No cut at min_lr, so the wait is not reset.
  assert waits == [0, 0, 0, 1, 2]


def _json_round_trip(state):
  d = json.loads(json.dumps(callbacks.to_dict(state), allow_nan=False))
  return callbacks.from_dict(type(state), d)


def test_states_round_trip_through_json():
  p = callbacks.plateau_init(1e-3)
  e = callbacks.EarlyStoppingState()
  for s in (p, e):
    restored = _json_round_trip(s)
    assert restored == s and restored.best is None
  for best in (float('inf'), float('-inf'), 2.5):
    for s in (callbacks.PlateauState(1e-3, best=best, wait=2),
              callbacks.EarlyStoppingState(best=best, best_epoch=3)):
      assert _json_round_trip(s) == s
  nan = _json_round_trip(callbacks.EarlyStoppingState(best=float('nan')))
  assert np.isnan(nan.best)


def test_states_written_before_best_could_be_none_still_load():
  # Checkpoints before best could be None wrote 'inf' for "no value yet".
  p = callbacks.from_dict(callbacks.PlateauState, {
      'learning_rate': 0.001, 'best': 'inf', 'wait': 0,
      'cooldown_counter': 0})
  assert p == callbacks.plateau_init(1e-3)
  e = callbacks.from_dict(callbacks.EarlyStoppingState, {
      'best': 'inf', 'best_epoch': 0, 'wait': 0, 'stopped_epoch': 0})
  assert e == callbacks.EarlyStoppingState()


# Agreement with the real Keras callbacks. Each val_loss sequence mixes the
# cases where the rules matter: clear drops, exact repeats of the previous
# value or of the best, values within min_delta of the best, values at the
# min_delta edge and near-ties (a float32 step, half of one, 1e-9) where
# float32 rounding decides, and rises. The states also go through JSON every
# epoch, as a resumed run's would.


def _keras_model(lr):
  """The smallest compiled model whose optimizer a callback can drive."""
  assert keras.__version__.startswith('3.'), keras.__version__
  assert keras.backend.backend() == 'tensorflow', keras.backend.backend()
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss='mse')
  return model


def _keras_lr(model):
  return np.float32(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def _random_losses(rng, n, min_delta):
  """A val_loss sequence of `n` Python floats (see the comment above)."""
  v = float(rng.uniform(0.5, 3.0))
  values, best = [v], v
  for _ in range(n - 1):
    ulp = float(np.spacing(np.float32(best)))
    kind = rng.choice(['drop', 'repeat', 'repeat_best', 'within', 'edge',
                       'tie', 'rise'], p=[.2, .1, .1, .15, .15, .15, .15])
    if kind == 'drop':
      v = best - min_delta - float(rng.uniform(0.0, 0.05))
    elif kind == 'repeat':
      v = values[-1]
    elif kind == 'repeat_best':
      v = best
    elif kind == 'within':
      v = best - float(rng.uniform(0.0, 1.0)) * min_delta
    elif kind == 'edge':
      v = best - min_delta + float(rng.choice([-1, -.5, 0, .5, 1])) * ulp
    elif kind == 'tie':
      v = best + float(rng.choice([-2, -1, -.5, .5, 1, -1e-9 / ulp])) * ulp
    else:
      v = values[-1] + float(rng.uniform(0.0, 0.05))
    values.append(v)
    if v + min_delta < best:  # Roughly Keras' best, to aim the edges.
      best = v
  return values


# (initial learning rate, min_lr): floors the rate reaches, or not.
_LR_FLOORS = ((1e-3, 0.0), (1e-3, 1e-4), (1e-3, 1e-5), (1e-3, 2e-4),
              (0.01, 0.0), (0.3, 1e-3))


def _same(*values):
  """`values` with NaN spelt out, so a NaN best equals Keras' NaN best."""
  return tuple('nan' if isinstance(v, float) and np.isnan(v) else v
               for v in values)


def _check_plateau_against_keras(model, lr, kwargs, values):
  """Drives Keras' ReduceLROnPlateau and ours side by side over `values`."""
  model.optimizer.learning_rate = lr
  cb = keras.callbacks.ReduceLROnPlateau(monitor='val_loss', mode='min',
                                         **kwargs)
  cb.set_model(model)
  cb.on_train_begin()
  state = callbacks.plateau_init(lr)
  for epoch, v in enumerate(values):
    cb.on_epoch_end(epoch, {'val_loss': v})
    state = _json_round_trip(callbacks.plateau_update(state, v, **kwargs))
    got = _same(np.float32(state.learning_rate), state.best, state.wait,
                state.cooldown_counter)
    want = _same(_keras_lr(model), cb.best, cb.wait, cb.cooldown_counter)
    assert got == want, (
        f'(lr, best, wait, cooldown_counter) after epoch {epoch + 1}: '
        f'ours {got}, Keras {want}; lr={lr!r}, {kwargs}, val_loss={values!r}')


def _check_early_stopping_against_keras(model, patience, min_delta, values):
  """Drives Keras' EarlyStopping and ours side by side until Keras stops."""
  model.stop_training = False
  cb = keras.callbacks.EarlyStopping(monitor='val_loss', mode='min',
                                     patience=patience, min_delta=min_delta)
  cb.set_model(model)
  cb.on_train_begin()
  state = callbacks.EarlyStoppingState()
  for epoch, v in enumerate(values):
    cb.on_epoch_end(epoch, {'val_loss': v})
    state = _json_round_trip(callbacks.early_stopping_update(
        state, v, epoch + 1, patience=patience, min_delta=min_delta))
    stopped = cb.stopped_epoch + 1 if model.stop_training else 0
    got = _same(state.should_stop, state.stopped_epoch, state.best_epoch,
                state.best, state.wait)
    want = _same(model.stop_training, stopped, cb.best_epoch + 1, cb.best,
                 cb.wait)
    assert got == want, (
        f'(should_stop, stopped_epoch, best_epoch, best, wait) after epoch '
        f'{epoch + 1}: ours {got}, Keras {want}; patience={patience}, '
        f'min_delta={min_delta}, val_loss={values!r}')
    if model.stop_training:  # fit() ends here.
      return


def test_plateau_matches_keras():
  rng = np.random.default_rng(20240611)
  model = _keras_model(1e-3)
  grid = itertools.product((0, 1, 2, 3), (0, 1, 2, 4), (0.0, 1e-4, 0.01))
  for patience, cooldown, min_delta in grid:
    for _ in range(4):
      lr, min_lr = _LR_FLOORS[rng.integers(len(_LR_FLOORS))]
      kwargs = dict(factor=float(rng.choice([0.1, 0.2, 0.5])),
                    patience=patience, min_delta=min_delta,
                    cooldown=cooldown, min_lr=min_lr)
      values = _random_losses(rng, int(rng.integers(12, 30)), min_delta)
      _check_plateau_against_keras(model, lr, kwargs, values)


def test_early_stopping_matches_keras():
  rng = np.random.default_rng(20240612)
  model = _keras_model(1e-3)
  for patience, min_delta in itertools.product((0, 1, 2, 3, 5),
                                               (0.0, 1e-4, 0.01)):
    for _ in range(8):
      values = _random_losses(rng, int(rng.integers(8, 25)), min_delta)
      _check_early_stopping_against_keras(model, patience, min_delta, values)


def test_non_finite_values_match_keras():
  # train.py stops on a non-finite loss first, but the functions stay exact:
  # a first NaN becomes Keras' best (nothing beats it afterwards), a first
  # inf is beaten by any finite value.
  inf, nan = float('inf'), float('nan')
  model = _keras_model(1e-3)
  for values in ([nan, 1.0, 0.5, 0.4, 0.3], [inf, 1.0, inf, 0.9, nan, 0.8],
                 [1.0, nan, inf, 0.9, -inf, 0.5], [inf, inf, inf, 2.0]):
    for min_delta in (0.0, 1e-4):
      _check_plateau_against_keras(
          model, 1e-3, dict(factor=0.5, patience=1, min_delta=min_delta,
                            cooldown=0, min_lr=0.0), values)
      _check_early_stopping_against_keras(model, 2, min_delta, values)
