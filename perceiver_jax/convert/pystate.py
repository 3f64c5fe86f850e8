"""DeepMind's haiku `.pystate` checkpoints, read without running their code.

A `.pystate` file (the Perceiver IO ImageNet classifiers' format) is a
pickle of `{'params': params, 'state': state}`, haiku's nested mappings of
numpy arrays: `params['perceiver_encoder/~/cross_attention/attention/linear']
['w']`, `state` holding the conv preprocessor's BatchNorm statistics.

Loading a pickle calls whatever globals it names, so a file from anywhere
could run any command. `read` unpickles with only the globals such a file
needs (`ALLOWED_GLOBALS`) and refuses every other one before calling it:
numpy's array and scalar reconstruction, under numpy 2's module names and
numpy 1's (which wrote these files), and haiku's `FlatMapping`, whose
pickles call it with a plain dict (haiku's `FlatMap.__reduce__` writes that
name "for backwards compatibility with old pickles"); it is read as the
dict, without haiku. Pickle protocols 0-2 write bytes through
`_codecs.encode`, which is not admitted: `pickle.dump` has written protocol
3 or later since Python 3.0.
"""

import pickle

from etils import epath
import numpy as np

from perceiver_jax import errors

# Protocols 3-4: ndarray.__reduce__ is _reconstruct(ndarray, (0,), b'b')
# followed by ndarray.__setstate__ with a dtype; 5: _frombuffer(buffer,
# dtype, shape, order). numpy scalars: scalar(dtype, bytes).
_NUMPY_GLOBALS = {
    ('numpy', 'ndarray'): ('numpy', 'ndarray'),
    ('numpy', 'dtype'): ('numpy', 'dtype'),
}
for _core in ('numpy._core', 'numpy.core'):  # numpy 2, numpy 1.
  _NUMPY_GLOBALS.update({
      (f'{_core}.multiarray', '_reconstruct'):
          ('numpy._core.multiarray', '_reconstruct'),
      (f'{_core}.multiarray', 'scalar'): ('numpy._core.multiarray', 'scalar'),
      (f'{_core}.numeric', '_frombuffer'): ('numpy._core.numeric',
                                            '_frombuffer'),
  })


def _flat_mapping(mapping):
  """haiku's `FlatMapping(mapping)`, as the plain dict it wraps."""
  if not isinstance(mapping, dict):
    raise pickle.UnpicklingError(
        f'FlatMapping called with a {type(mapping).__name__}, not a dict')
  return dict(mapping)


_HAIKU_GLOBALS = {('haiku._src.data_structures', 'FlatMapping'): _flat_mapping}

ALLOWED_GLOBALS = frozenset(_NUMPY_GLOBALS) | frozenset(_HAIKU_GLOBALS)
# Where the checkpoints are, for errors.
WHERE = 'README, "Perceiver IO\'s published weights", links them'


class _ForbiddenGlobal(Exception):
  """The pickle names a global outside ALLOWED_GLOBALS."""


class _Unpickler(pickle.Unpickler):
  """Resolves only ALLOWED_GLOBALS; anything else stops the load."""

  def find_class(self, module, name):
    if (module, name) in _HAIKU_GLOBALS:
      return _HAIKU_GLOBALS[module, name]
    if (module, name) in _NUMPY_GLOBALS:
      return super().find_class(*_NUMPY_GLOBALS[module, name])
    raise _ForbiddenGlobal(f'{module}.{name}')

  def persistent_load(self, pid):
    raise pickle.UnpicklingError('it refers to persistent objects')


def _load(path):
  """The unpickled object of the file at `path`, with only allowed globals."""
  try:
    with epath.Path(path).open('rb') as f:
      return _Unpickler(f).load()
  except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
    raise errors.InputError(
        f'{path}: cannot read it ({type(e).__name__}). Pass the path of a '
        f'downloaded .pystate file ({WHERE}).') from None
  except _ForbiddenGlobal as e:
    raise errors.InputError(
        f'{path}: refused: the pickle calls {e}, which a haiku .pystate '
        'checkpoint never needs (it holds dicts of numpy arrays), and '
        'loading a pickle runs what it calls. Nothing in it was run. Use a '
        f'checkpoint from DeepMind\'s Perceiver IO release ({WHERE}), or, '
        'for other weights, save them as a pickle of dicts of numpy '
        'arrays.') from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, KeyError, UnicodeDecodeError,
          OverflowError) as e:
    raise errors.InputError(
        f'{path}: not a readable pickle ({type(e).__name__}: {e}); the '
        'file may be truncated or not a .pystate checkpoint. Download it '
        f'again ({WHERE}).') from None


def _flatten(tree, where, path):
  """`{'scope/name': array}` of haiku's `{scope: {name: array}}`."""
  if not isinstance(tree, dict):
    raise errors.InputError(
        f'{path}: {where} is a {type(tree).__name__}, not a mapping of '
        'haiku module names to their arrays; not a haiku checkpoint.')
  flat = {}
  for scope, arrays in tree.items():
    if not isinstance(arrays, dict):
      raise errors.InputError(
          f'{path}: {where}[{scope!r}] is a {type(arrays).__name__}, not a '
          'mapping of parameter names to arrays; not a haiku checkpoint.')
    for name, value in arrays.items():
      if not isinstance(value, (np.ndarray, np.generic)) or (
          np.asarray(value).dtype.kind not in 'biuf'):
        what = ' '.join([type(value).__name__] + (
            [f'of dtype {value.dtype}'] if hasattr(value, 'dtype') else []))
        raise errors.InputError(
            f'{path}: {where}[{scope!r}][{name!r}] is {what}, not a '
            'numeric numpy array; not a haiku checkpoint.')
      flat[f'{scope}/{name}'] = np.asarray(value)
  return flat


def read(path):
  """`{'params': {name: array}, 'state': {name: array}}` of a .pystate.

  Names are haiku's module path and parameter name joined by '/', e.g.
  'perceiver_encoder/~/cross_attention/attention/linear/w'. A file holding
  the params mapping alone (no 'params' key) reads with an empty state.
  """
  checkpoint = _load(path)
  if not isinstance(checkpoint, dict):
    raise errors.InputError(
        f'{path}: holds a {type(checkpoint).__name__}, not the dict '
        "{'params': ..., 'state': ...} of a haiku checkpoint.")
  if 'params' not in checkpoint:
    checkpoint = {'params': checkpoint, 'state': {}}
  extra = sorted(set(checkpoint) - {'params', 'state'})
  if extra:
    raise errors.InputError(
        f'{path}: besides params and state it holds {extra}; not a haiku '
        "checkpoint of {'params': ..., 'state': ...}.")
  return {part: _flatten(checkpoint.get(part, {}), part, path)
          for part in ('params', 'state')}
