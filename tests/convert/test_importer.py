"""`main.py --mode=import`: a HuggingFace checkpoint as a workdir that
predict, the attention maps and init_from use, with HuggingFace's eval
preprocessing and logits."""

import copy
import json
import os
import subprocess
import sys

from configs import cifar100_finetune
from configs import imagenet_perceiver_io
import jax
import numpy as np
from PIL import Image
import pytest

import perceiver_jax
from perceiver_jax import errors
from perceiver_jax.convert import importer
from perceiver_jax.data import host_transforms
from perceiver_jax.tools import attention_maps
from perceiver_jax.tools import evaluate
from perceiver_jax.tools import predict
from perceiver_jax.tools import trained as trained_lib
from perceiver_jax.training import experiment
from tests.support import subprocess_env

import torch  # Test-only (requirements-test.txt): the reference.
import transformers  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
NAMES = [f'class number {i}' for i in range(1000)]  # ImageNet's count.


@pytest.fixture(scope='module')
def hf_model(tmp_path_factory):
  """A tiny HuggingFace conv classifier of ImageNet's 1000 classes, saved."""
  config = transformers.PerceiverConfig(
      **cifar100_finetune.TEST_PUBLISHED, id2label=dict(enumerate(NAMES)))
  torch.manual_seed(1)
  model = transformers.PerceiverForImageClassificationConvProcessing(
      config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.endswith(('latents', 'position_embeddings')):
        p.add_(0.2 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp('hf') / 'vision-perceiver-tiny'
  model.save_pretrained(str(folder))
  return model, folder


@pytest.fixture(scope='module')
def workdir(hf_model, tmp_path_factory):
  """The checkpoint imported by main.py, as a user runs it."""
  _, folder = hf_model
  path = tmp_path_factory.mktemp('imported') / 'run'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'main.py'), '--mode=import',
       f'--source={folder}', f'--workdir={path}'],
      capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return path


def test_the_workdir_holds_what_training_leaves(workdir):
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['preprocessor'] == 'conv'
  assert saved['conv_stem_padding'] == 'huggingface'
  assert saved['image_size'] == 224 and saved['dataset'] == 'imagenet2012'
  stats = json.loads((workdir / 'normalization.json').read_text())
  np.testing.assert_allclose(stats['mean'], [123.675, 116.28, 103.53])
  np.testing.assert_allclose(np.sqrt(stats['variance']),
                             [58.395, 57.12, 57.375])
  assert json.loads((workdir / 'class_names.json').read_text()) == NAMES
  assert (workdir / 'checkpoints' / '0').is_dir()


def _photo(height=256, width=320, seed=0):
  return Image.fromarray(np.random.RandomState(seed).randint(
      0, 256, (height, width, 3), dtype=np.uint8))


def test_eval_preprocessing_and_logits_are_huggingfaces(hf_model, workdir):
  """A 256 x 320 photo: HuggingFace's image processor (centre crop of
  224/256 of the shorter side, resize to 224, ImageNet's normalisation)
  and its model give the logits the workdir gives from the uint8 file.

  The crop is exactly 224 x 224 here, so neither side resamples (where
  they do, HuggingFace resizes with bicubic and this pipeline with
  bilinear: see README). Breaking the normalisation (a mean off by one
  grey level) moves the pixels by 0.017.
  """
  model, _ = hf_model
  photo = _photo()
  processor = transformers.PerceiverImageProcessorPil()
  theirs = processor(photo, return_tensors='np')['pixel_values']
  trained = trained_lib.load(str(workdir),
                             mesh=trained_lib.single_device_mesh())
  transform = host_transforms.HostTransform.from_config(trained.config,
                                                        trained.info)
  view = transform.eval_view(photo)
  ours = np.asarray(trained.preprocess(view[None]))
  np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), atol=2e-6)
  with torch.no_grad():
    reference = copy.deepcopy(model).double()(
        inputs=torch.from_numpy(theirs).double()).logits.numpy()
  logits = trained.logits(view[None])
  scale = np.abs(reference).max()
  assert np.abs(logits - reference).max() <= 1e-5 * scale


def test_predict_names_imagenet_classes(workdir, tmp_path, capsys):
  path = tmp_path / 'photo.png'
  _photo(seed=3).save(path)
  predictions = predict.run(str(workdir), [str(path)])
  assert all(name in NAMES for name in predictions[0].classes)
  out = capsys.readouterr().out
  assert predictions[0].classes[0] in out


def test_attention_maps_are_on_the_stems_grid(workdir):
  trained = trained_lib.load(str(workdir),
                             mesh=trained_lib.single_device_mesh())
  assert trained.model.input_grid == (55, 55)  # 224 -> 112 -> 55.
  images = np.stack([np.asarray(_photo(224, 224, seed))
                     for seed in range(2)])
  maps, _ = attention_maps.cross_attention_maps(trained, images)
  assert maps.shape == (2, 8, 55, 55)
  np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)


def test_a_fine_tuning_run_starts_from_the_imported_weights(workdir,
                                                            tmp_path):
  """init_from: every weight, the frozen BatchNorm statistics included,
  and the normalisation of the imported workdir."""
  saved = json.loads((workdir / 'config.json').read_text())
  config = imagenet_perceiver_io.get_config('test')
  for name in ('image_size', 'latent_dim', 'projection_dim', 'num_heads',
               'ffn_units', 'num_transformer_blocks', 'num_iterations',
               'preprocessor_channels', 'fourier_num_bands',
               'fourier_max_resolution', 'conv_stem_padding',
               'num_cross_heads'):
    config[name] = tuple(saved[name]) if isinstance(saved[name], list) else (
        saved[name])
  config.init_from = str(workdir)
  config.mock_num_examples = 16
  config.batch_size = 8
  ex = experiment.Experiment(config, str(tmp_path / 'finetune'))
  try:
    state, _ = ex.restore_or_init()
  finally:
    ex.close()
  imported = trained_lib.load(str(workdir),
                              mesh=trained_lib.single_device_mesh())
  got = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
  want = dict(jax.tree_util.tree_leaves_with_path(
      jax.device_get(imported.params)))
  assert len(got) == len(want)
  for key, value in got:
    np.testing.assert_array_equal(value, want[key], err_msg=str(key))
  np.testing.assert_allclose(ex.stats['mean'], [123.675, 116.28, 103.53])


def test_a_workdir_with_checkpoints_or_an_unknown_source_is_refused(
    workdir, tmp_path):
  base = imagenet_perceiver_io.get_config()
  with pytest.raises(errors.InputError, match='already holds checkpoints'):
    importer.import_checkpoint(str(workdir), str(workdir), base)
  with pytest.raises(errors.InputError, match='is not a checkpoint this'):
    importer.import_checkpoint(str(tmp_path), str(tmp_path / 'new'), base)


def test_eval_runs_on_an_import_with_a_mock_data_config(hf_model, tmp_path,
                                                        capsys):
  """--mode=eval's code path on the import, with the :test config's mock
  ImageNet as the base config (its data fields), 16 x 16 images."""
  _, folder = hf_model
  path = tmp_path / 'run'
  config = importer.import_checkpoint(
      str(folder), str(path), imagenet_perceiver_io.get_config('test'),
      image_size=16)
  assert config.mock_data and config.image_size == 16
  evaluated = evaluate.run(str(path))
  out = capsys.readouterr().out
  assert 'Test accuracy' in out
  assert evaluated['num_examples'] > 0 and evaluated['step'] == 0
  assert np.isfinite(evaluated['test_loss'])


def test_cifar100_finetune_and_the_python_api_on_an_import(
    workdir, fake_cifar100, tmp_path):
  """configs/cifar100_finetune.py:test fine-tunes the import (224 -> 32,
  1000 -> 100 classes) on CIFAR-100, and `perceiver_jax.load` serves the
  result."""
  run = tmp_path / 'cifar100_ft'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'main.py'),
       '--config=configs/cifar100_finetune.py:test', f'--workdir={run}',
       f'--config.init_from={workdir}',
       f'--config.tfds_data_dir={fake_cifar100.data_dir}'],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env=subprocess_env(devices=1), check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert f'Initialised from the latest checkpoint of {workdir}' in proc.stderr
  assert 'Test accuracy: ' in proc.stdout
  stats = json.loads((run / 'normalization.json').read_text())
  np.testing.assert_allclose(stats['mean'], [123.675, 116.28, 103.53])
  model = perceiver_jax.load(str(run))
  images = fake_cifar100.test_images[:4]
  assert model.input_shape == (32, 32, 3)
  predictions = model.predict(images, top_k=3)
  assert len(predictions) == 4
  for prediction in predictions:
    assert len(prediction.classes) == 3
    assert all(name.startswith('fine_') for name in prediction.classes)
  logits = model.logits(images)
  assert logits.shape == (4, 100) and np.isfinite(logits).all()
