"""DeepMind's `.pystate` checkpoints imported: the logits of the model they
describe, as DeepMind's haiku code and as HuggingFace's port compute them.

Each of HuggingFace's three classes, small and random, is written as the
haiku checkpoint it would have been converted from (`haiku_checkpoints`)
and imported. With HuggingFace's computation (exact GELU, its conv-stem
padding, the learned model's decoder residual) the imported weights must
give HuggingFace's logits; as imported (`importer.deepmind_fields`) they
must give those of HuggingFace's model changed where DeepMind's code
differs from it.
"""

import json
import os
import subprocess
import sys

from configs import imagenet_perceiver_io
from etils import epath
import ml_collections
import numpy as np
import pytest
import torch

from perceiver_jax import errors
from perceiver_jax.convert import haiku
from perceiver_jax.convert import imagenet_classes
from perceiver_jax.convert import importer
from perceiver_jax.model import perceiver
from perceiver_jax.tools import trained as trained_lib
from perceiver_jax.training import transfer
from tests.convert import haiku_checkpoints
from tests.convert.test_huggingface import _assert_parity
from tests.convert.test_huggingface import _hf_logits
from tests.support import ROOT
from tests.support import subprocess_env

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)

SIZE = haiku_checkpoints.SMALL['image_size']
# What the small models' weights do not show (DeepMind's are haiku.RELEASE).
SMALL_RELEASE = {name: haiku_checkpoints.SMALL[name] for name in haiku.RELEASE}


def huggingface_fields(variant):
  """The fields where HuggingFace's port computes otherwise."""
  fields = dict(gelu_approximate=False, decoder_query_residual=True)
  if variant == 'conv':
    fields['conv_stem_padding'] = 'huggingface'
  return fields


def _same_padding(size, kernel, stride):
  """TensorFlow's SAME padding (before, after) along one axis."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def as_deepmind_computes(model, variant, image_size):
  """`model` (HuggingFace's, changed in place) computing as DeepMind's
  haiku code: jax.nn.gelu's tanh GELU, SAME padding of the conv stem's
  convolution and max-pool, no query residual in the learned classifier's
  decoder."""
  for module in model.modules():
    if hasattr(module, 'intermediate_act_fn'):  # PerceiverMLP
      module.intermediate_act_fn = torch.nn.GELU(approximate='tanh')
  if variant == 'conv':
    stem = model.perceiver.input_preprocessor.convnet
    conv = _same_padding(image_size, 7, 2)
    stem.conv.zero_pad_2d = torch.nn.ZeroPad2d(conv * 2)
    pool = _same_padding(-(-image_size // 2), 3, 2)
    stem.max_pool = torch.nn.Sequential(
        torch.nn.ConstantPad2d(pool * 2, float('-inf')),
        torch.nn.MaxPool2d(kernel_size=3, stride=2))
  if variant == 'learned':
    model.perceiver.decoder.decoder.decoding_cross_attention.attention \
        .use_query_residual = False
  return model


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """variant -> (HuggingFace's model, its .pystate's import)."""
  out = {}
  for variant in haiku.VARIANTS:
    model = haiku_checkpoints.hf_model(variant)
    path = haiku_checkpoints.write_pystate(
        tmp_path_factory.mktemp('pystate') / f'{variant}.pystate',
        haiku_checkpoints.state_dict(model))
    out[variant] = model, importer.read_pystate(
        epath.Path(path), image_size=SIZE, release=SMALL_RELEASE)
  return out


def _images(count=2, seed=0):
  return np.random.RandomState(seed).randn(count, 3, SIZE, SIZE).astype(
      np.float32)


def _logits(source, images, **changes):
  config = ml_collections.ConfigDict({**source.fields, **changes})
  model = perceiver.create_model(config, len(source.class_names))
  return np.asarray(model.apply({'params': source.params},
                                images.transpose(0, 2, 3, 1), train=False))


@pytest.mark.parametrize('variant', haiku.VARIANTS)
def test_with_huggingfaces_computation_it_gives_huggingfaces_logits(
    imported, variant, monkeypatch):
  model, source = imported[variant]
  assert source.variant == variant
  images = _images()
  _assert_parity(_logits(source, images, **huggingface_fields(variant)),
                 _hf_logits(model, images, monkeypatch))


@pytest.mark.parametrize('variant', haiku.VARIANTS)
def test_as_imported_it_computes_as_deepminds_code(imported, variant,
                                                   monkeypatch):
  model, source = imported[variant]
  images = _images(seed=1)
  reference = _hf_logits(as_deepmind_computes(
      haiku_checkpoints.hf_model(variant), variant, SIZE), images,
                           monkeypatch)
  _assert_parity(_logits(source, images), reference)
  # The differences show: HuggingFace's logits are outside the tolerance
  # (by 9e-5 of the scale for 'fourier', where only the GELU differs).
  assert np.abs(reference - _hf_logits(model, images, monkeypatch)).max() > (
      3e-5 * np.abs(reference).max())


def test_the_import_reads_the_architecture_from_the_shapes(imported):
  _, source = imported['learned']
  fields = source.fields
  assert (fields['latent_dim'], fields['projection_dim']) == (8, 24)
  assert fields['num_transformer_blocks'] == 2  # Layers of the block.
  assert fields['num_iterations'] == 2  # SMALL_RELEASE's num_blocks.
  assert fields['image_size'] == SIZE  # The position table's rows.
  assert fields['ffn_units'] == (24, 24)
  assert source.class_names == [str(i) for i in range(10)]
  assert source.description['format'] == 'haiku'


def test_main_imports_a_pystate_as_deepmind_released_it(tmp_path,
                                                        monkeypatch):
  """main.py --mode=import on a .pystate of DeepMind's architecture (8
  applications of the block, 8 and 1 heads; tiny widths) and 1000 classes:
  the workdir's config, ImageNet's class names, the logits of DeepMind's
  computation at 224 x 224, and the fields a fine-tuning config needs
  (README)."""
  model = haiku_checkpoints.hf_model(
      'conv', num_labels=1000, d_latents=32, num_self_attends_per_block=1,
      **haiku.RELEASE)
  path = haiku_checkpoints.write_pystate(
      tmp_path / 'imagenet_conv_preprocessing.pystate',
      haiku_checkpoints.state_dict(model))
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'main.py'), '--mode=import',
       f'--source={path}', f'--workdir={workdir}'],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env=subprocess_env(devices=1), check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads((workdir / 'config.json').read_text())
  assert (config['preprocessor'], config['conv_stem_padding'],
          config['gelu_approximate'], config['decoder_query_residual'],
          config['num_iterations'], config['num_heads'],
          config['num_cross_heads'], config['image_size']) == (
              'conv', 'same', True, True, 8, 8, 1, 224)
  names = json.loads((workdir / 'class_names.json').read_text())
  assert names == list(imagenet_classes.names())
  stats = json.loads((workdir / 'normalization.json').read_text())
  assert stats['source']['format'] == 'haiku'
  trained = trained_lib.load(str(workdir),
                             mesh=trained_lib.single_device_mesh())
  images = np.random.RandomState(2).randn(1, 3, 224, 224).astype(np.float32)
  logits = np.asarray(trained.model.apply(
      {'params': trained.params}, images.transpose(0, 2, 3, 1), train=False))
  _assert_parity(logits, _hf_logits(as_deepmind_computes(model, 'conv', 224),
                                    images, monkeypatch))
  finetune = imagenet_perceiver_io.get_config('conv')
  for name in ('latent_dim', 'projection_dim', 'ffn_units',
               'num_transformer_blocks'):  # The tiny widths.
    finetune[name] = config[name]
  finetune.init_from = str(workdir)
  with pytest.raises(errors.InputError, match=(
      "conv_stem_padding: 'same' -> 'huggingface'; gelu_approximate: True "
      '-> False.')):
    transfer.check_source(finetune)
  finetune.gelu_approximate, finetune.conv_stem_padding = True, 'same'
  transfer.check_source(finetune)


class _System:
  """Pickles as `os.system(command)`."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_main_refuses_a_pystate_that_would_run_a_command(tmp_path):
  marker = tmp_path / 'ran'
  checkpoint = haiku.to_haiku(haiku_checkpoints.state_dict(
      haiku_checkpoints.hf_model('fourier')))
  checkpoint['params']['perceiver_encoder/~/trainable_position_encoding'][
      'pos_embs'] = _System(f'touch {marker}')
  path = tmp_path / 'imagenet_fourier_position_encoding.pystate'
  path.write_bytes(haiku_checkpoints.pickle_bytes(checkpoint))
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'main.py'), '--mode=import',
       f'--source={path}', f'--workdir={tmp_path / "run"}'],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env=subprocess_env(devices=1), check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith(f'Error: {path}: refused: the pickle calls '
                          f'{os.system.__module__}.system, ')
  assert 'Traceback' not in result.stderr
  assert not marker.exists() and not (tmp_path / 'run').exists()
