"""The Python API: `perceiver_jax.load(workdir)`, its logits and predictions.

Reads the session's trained fake-data run (`conftest.py`): CIFAR-100 mock
images stored 32 x 32, a model of image_size 16, EMA weights.
"""

import json
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import scipy.special

import perceiver_jax
from perceiver_jax import errors
from perceiver_jax.tools import attention_maps
from perceiver_jax.tools import evaluate
from perceiver_jax.tools import predict
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps
from tests.support import ROOT
from tests.tools.conftest import MOCK_EXAMPLES

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


@pytest.fixture(scope='module')
def model(workdir):
  return perceiver_jax.load(str(workdir[0]))


def _eval_mode_logits(workdir, monkeypatch):
  """(images, logits) of every test example, as `--mode=eval` computes them:
  its own run, with only the metric sums of its jitted eval step replaced
  by the logits."""
  monkeypatch.setattr(steps, '_metric_sums',
                      lambda logits, labels, mask: {'logits': logits})
  seen = []

  def evaluate_batches(eval_step, state, pipeline, split, mesh):
    for batch in pipeline.eval_batches(split):
      logits = eval_step(state, sharding_lib.global_batch(mesh, batch))
      keep = batch['mask'] > 0
      seen.append((batch['image'][keep],
                   np.asarray(logits['logits'])[keep]))
    return {'loss': 0.0, 'accuracy': 0.0, 'top5_accuracy': 0.0}

  monkeypatch.setattr(evaluate.loop, 'evaluate', evaluate_batches)
  evaluate.run(str(workdir))
  return (np.concatenate([i for i, _ in seen]),
          np.concatenate([l for _, l in seen]))


def test_logits_are_eval_modes_on_the_same_images(model, workdir,
                                                  monkeypatch):
  images, want = _eval_mode_logits(workdir[0], monkeypatch)
  assert images.shape == (MOCK_EXAMPLES, 32, 32, 3)  # As stored.
  assert model.input_shape == (32, 32, 3)
  assert model.config.image_size == 16  # The device resizes them.
  got = model.logits(images)
  assert got.dtype == np.float32 and got.shape == (MOCK_EXAMPLES, 100)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Batched or not, the same logits.
  np.testing.assert_allclose(model.logits(images, batch_size=3),
                             got, rtol=1e-5, atol=1e-6)


def test_predict_gives_the_top_k_names_and_probabilities(model, workdir):
  images, _ = attention_maps.first_test_examples(model.config, 5)
  names = json.loads((workdir[0] / 'class_names.json').read_text())
  probabilities = scipy.special.softmax(
      model.logits(images).astype(np.float64), axis=-1)
  predictions = model.predict(images, top_k=3)
  assert len(predictions) == 5
  for prediction, p in zip(predictions, probabilities):
    order = np.argsort(-p)[:3]
    assert prediction.classes == tuple(names[i] for i in order)
    np.testing.assert_allclose(prediction.probabilities, p[order],
                               rtol=1e-9)
    assert prediction.path is None
  everything = model.predict(images[:1], top_k=1000)[0]
  assert len(everything.classes) == 100
  assert sorted(everything.classes) == sorted(names)
  assert sum(everything.probabilities) == pytest.approx(1.0)
  assert model.predict(images)[0].classes == everything.classes[:5]


def test_image_files_are_read_as_predict_mode_reads_them(model, workdir,
                                                         tmp_path):
  rng = np.random.default_rng(0)
  paths = []
  for name, shape in (('wide.png', (20, 50, 3)), ('gray.png', (40, 40))):
    paths.append(str(tmp_path / name))
    Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(paths[-1])
  images = model.load_images(paths)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
  cli = predict.run(str(workdir[0]), paths)
  for mine, theirs in zip(model.predict(images), cli):
    assert mine.classes == theirs.classes
    np.testing.assert_allclose(mine.probabilities, theirs.probabilities,
                               rtol=1e-6)


def test_wrong_images_are_refused_with_the_shape_it_takes(model):
  at_image_size = np.zeros((2, 16, 16, 3), np.uint8)
  with pytest.raises(errors.InputError) as e:
    model.logits(at_image_size)
  message = str(e.value)
  assert 'takes uint8 images [N, 32, 32, 3] (values 0..255)' in message
  assert 'cifar100 images as stored, which evaluation resizes to ' \
         'image_size=16; got uint8 [2, 16, 16, 3]' in message
  assert '\n' not in message
  for images, got in ((np.zeros((2, 32, 32, 3), np.float32),
                       'got float32 [2, 32, 32, 3]'),
                      (np.zeros((32, 32, 3), np.uint8),
                       'got uint8 [32, 32, 3]'),
                      (np.zeros((1, 32, 32, 1), np.uint8),
                       'got uint8 [1, 32, 32, 1]')):
    with pytest.raises(errors.InputError, match=re.escape(f'{got}. Pass a batch')):
      model.predict(images)
  with pytest.raises(errors.InputError, match='top_k=0 must be a positive'):
    model.predict(np.zeros((1, 32, 32, 3), np.uint8), top_k=0)


def test_importing_the_package_imports_no_jax():
  code = ('import sys, perceiver_jax\n'
          'assert "load" in perceiver_jax.__all__\n'
          'print(sorted({m.split(".")[0] for m in sys.modules}\n'
          '             & {"jax", "flax", "tensorflow", "orbax"}))\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        check=True)
  assert proc.stdout.strip() == '[]'
