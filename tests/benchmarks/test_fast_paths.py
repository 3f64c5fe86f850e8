"""benchmarks/fast_paths.py: the verdicts, on made-up outcomes."""

import numpy as np
import pytest

from benchmarks import fast_paths


def _outcome(losses, grad_norms):
  return {'losses': losses, 'grad_norms': grad_norms}


def test_compare_verdicts():
  reference = _outcome([4.6, 4.5], [2.0, 1.9])
  update = np.array([1.0, -1.0, 1.0, 1.0])
  same = fast_paths.compare(reference, reference, update, update)
  assert same['verdict'] == 'ok' and same['cosine'] == pytest.approx(1.0)
  # Rounding-sized differences pass; each bound is a relative error.
  close = fast_paths.compare(_outcome([4.601, 4.501], [2.01, 1.91]),
                               reference, update * 1.01, update)
  assert close['verdict'] == 'ok', close
  assert close['loss'] == pytest.approx(0.001 / 4.5)
  # A loss 1% off, a gradient norm 10% off, an update with a flipped weight.
  for outcome, new_update, problem in (
      (_outcome([4.6, 4.545], [2.0, 1.9]), update, 'loss'),
      (_outcome([4.6, 4.5], [2.2, 1.9]), update, 'grad_norm'),
      (reference, update * [1, 1, -1, 1], 'update'),
      (reference, update * [1, 1, 0, 1], 'cosine')):
    verdict = fast_paths.compare(outcome, reference, new_update,
                                   update)['verdict']
    assert verdict.startswith('FAIL: ' + problem), verdict
  tiny = fast_paths.compare(_outcome([4.6], [0.01]), _outcome([4.6], [0.01]),
                              update, update)
  assert 'reference gradient norm too small' in tiny['verdict']
