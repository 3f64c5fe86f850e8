"""The `.pystate` reader: haiku's pickles read; a pickle that would run code
is refused before it runs anything, in one paragraph naming file and call."""

import builtins
import os
import pickle

import numpy as np
from numpy.testing._private import utils as numpy_testing_utils
import pytest

from perceiver_jax import errors
from perceiver_jax.convert import haiku
from perceiver_jax.convert import pystate
from tests.convert import haiku_checkpoints

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


@pytest.fixture(scope='module')
def conv_state_dict():
  """The conv classifier's: the one with BatchNorm statistics in `state`."""
  return haiku_checkpoints.state_dict(haiku_checkpoints.hf_model('conv'))


def _assert_reads_as(read, checkpoint):
  for part in ('params', 'state'):
    want = haiku_checkpoints.flat({part: checkpoint[part]})
    assert set(read[part]) == set(want)
    for name, array in want.items():
      got = read[part][name]
      assert (got.dtype, got.shape) == (array.dtype, array.shape), name
      np.testing.assert_array_equal(got, array, err_msg=name)


@pytest.mark.parametrize('protocol', [3, 4, 5])
def test_reads_params_and_state_as_haiku_pickled_them(
    tmp_path, conv_state_dict, protocol):
  path = haiku_checkpoints.write_pystate(tmp_path / 'c.pystate',
                                         conv_state_dict, protocol)
  assert b'FlatMapping' in path.read_bytes()
  read = pystate.read(path)
  assert 'image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema/' \
      'counter' in read['state']
  _assert_reads_as(read, haiku.to_haiku(conv_state_dict))


def test_reads_numpy_1_names(tmp_path, conv_state_dict):
  # numpy 1 (which wrote DeepMind's files) pickles arrays through
  # numpy.core.multiarray._reconstruct; protocol 3 names globals in plain
  # text, so the numpy 2 names can be swapped for them in place.
  data = haiku_checkpoints.pickle_bytes(
      haiku.to_haiku(conv_state_dict), protocol=3)
  assert b'numpy._core.multiarray\n_reconstruct' in data
  path = tmp_path / 'numpy1.pystate'
  path.write_bytes(data.replace(b'numpy._core.', b'numpy.core.'))
  _assert_reads_as(pystate.read(path), haiku.to_haiku(conv_state_dict))


class _Call:
  """Pickles as a call of `function(*args)`: what a hostile file holds."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


def _payloads(marker):
  """(call that writes `marker`, the global pickle names for it)."""
  python = f'open({str(marker)!r}, "w").close()'
  return [
      (_Call(os.system, f'touch {marker}'), f'{os.system.__module__}.system'),
      (_Call(builtins.exec, python), 'builtins.exec'),
      # numpy's own modules hold code runners too: admitted globals are
      # names, not modules.
      (_Call(numpy_testing_utils.runstring, python, {}),
       'numpy.testing._private.utils.runstring'),
  ]


@pytest.mark.parametrize('which', range(3))
def test_refuses_a_pickle_that_runs_code(tmp_path, conv_state_dict, which):
  marker = tmp_path / 'ran'
  payload, name = _payloads(marker)[which]
  checkpoint = haiku.to_haiku(conv_state_dict)
  # Hidden among the arrays, after ordinary ones.
  checkpoint['params']['classification_decoder/~/basic_decoder/output'][
      'w'] = payload
  path = tmp_path / 'hostile.pystate'
  path.write_bytes(pickle.dumps(checkpoint))
  with pytest.raises(errors.InputError) as e:
    pystate.read(path)
  message = str(e.value)
  assert '\n' not in message
  assert str(path) in message and f'calls {name},' in message
  assert 'Nothing in it was run' in message
  assert not marker.exists()
  # The payload is real: plain pickle runs it.
  pickle.loads(path.read_bytes())
  assert marker.exists()


def test_refuses_what_is_not_a_checkpoint(tmp_path, conv_state_dict):
  data = haiku_checkpoints.pickle_bytes(haiku.to_haiku(conv_state_dict))
  cases = {
      'missing.pystate': (None, 'cannot read it (FileNotFoundError)'),
      'truncated.pystate': (data[:len(data) // 2], 'not a readable pickle'),
      'list.pystate': (pickle.dumps([1, 2]), 'holds a list, not the dict'),
      'strings.pystate': (pickle.dumps({'params': {'m': {
          'w': np.array(['a'], dtype=object)}}}),
                          "params['m']['w'] is ndarray of dtype object, not a "
                          'numeric numpy array'),
      'extra.pystate': (pickle.dumps({'params': {}, 'opt': {}}),
                        "besides params and state it holds ['opt']"),
  }
  for name, (data, expected) in cases.items():
    path = tmp_path / name
    if data is not None:
      path.write_bytes(data)
    with pytest.raises(errors.InputError) as e:
      pystate.read(path)
    assert str(path) in str(e.value) and expected in str(e.value), name
