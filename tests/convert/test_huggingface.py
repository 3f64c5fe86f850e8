"""HuggingFace's Perceiver IO classifiers imported: logits, sizes, refusals.

Small `PerceiverConfig`s with random weights (nothing is downloaded):
HuggingFace's PyTorch models, saved with `save_pretrained`, imported, and
compared on the same normalised images.
"""

import copy
import json
import sys

from configs import imagenet_perceiver_io
import jax
import ml_collections
import numpy as np
import pytest

from perceiver_jax import errors
from perceiver_jax.convert import huggingface
from perceiver_jax.convert import importer
from perceiver_jax.model import perceiver

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

IMAGE_SIZE = 32
CLASSES = 10
# d_model: the preprocessor's width, which HuggingFace's classes fix:
# conv1x1 256 + positions 256; 3 pixels + 2 * (2 * 64 + 1) Fourier
# features; 64 conv channels + the same 258.
VARIANTS = {
    'learned': ('PerceiverForImageClassificationLearned', 512),
    'fourier': ('PerceiverForImageClassificationFourier', 261),
    'conv': ('PerceiverForImageClassificationConvProcessing', 322),
}


def _hf_model(variant, seed=0):
  """A small HuggingFace classifier with random weights (LayerNorms and
  BatchNorm included, so none is the identity)."""
  name, d_model = VARIANTS[variant]
  config = transformers.PerceiverConfig(
      num_latents=8, d_latents=32, d_model=d_model, num_blocks=2,
      num_self_attends_per_block=2, num_cross_attention_heads=1,
      num_self_attention_heads=4, num_labels=CLASSES, image_size=IMAGE_SIZE,
      architectures=[name],
      id2label={i: f'class {i}' for i in range(CLASSES)})
  torch.manual_seed(seed)
  model = getattr(transformers, name)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # The latents and the decoder's query keep their init (stddev 0.02):
      # LayerNorms of such small inputs show their epsilon.
      if not name.endswith(('latents', 'position_embeddings')):
        p.add_(0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.normal_()
      elif name.endswith('running_var'):
        b.uniform_(0.5, 2.0)
  return model


def _save(model, folder, safe=True):
  """`save_pretrained`'s folder; `safe=False`: its weights as
  pytorch_model.bin instead, a pickled state dict as the published
  checkpoints have it (transformers 5 writes only safetensors)."""
  model.save_pretrained(str(folder))
  if not safe:
    (folder / 'model.safetensors').unlink()
    torch.save(model.state_dict(), folder / 'pytorch_model.bin')
  return folder


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """variant -> (HuggingFace model, its save_pretrained folder)."""
  out = {}
  for variant in VARIANTS:
    model = _hf_model(variant)
    out[variant] = model, _save(
        model, tmp_path_factory.mktemp('hf') / variant)
  return out


def _images(count=2, seed=0):
  """Normalised NCHW float images, as HuggingFace's model takes them."""
  return np.random.RandomState(seed).randn(
      count, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)


def _hf_logits(model, images, monkeypatch):
  """HuggingFace's function computed in float64, its Fourier features'
  positions and frequencies included: the reference.

  (HuggingFace makes those with float32 `torch.linspace`, 4e-6 off at 112,
  which moves these logits by up to 2e-5 of their scale; this model
  computes the features in float64 and rounds them once. The test is of
  the model and the conversion, not of either library's linspace.)
  """
  linspace = torch.linspace
  monkeypatch.setattr(torch, 'linspace', lambda *args, **kwargs: linspace(
      *args, **dict(kwargs, dtype=torch.float64)))
  model = copy.deepcopy(model).double()
  with torch.no_grad():
    logits = model(inputs=torch.from_numpy(images).double()).logits.numpy()
  monkeypatch.undo()
  return logits


def _logits(source, images):
  config = ml_collections.ConfigDict(source.fields)
  model = perceiver.create_model(config, len(source.class_names))
  return np.asarray(model.apply({'params': source.params},
                                images.transpose(0, 2, 3, 1), train=False))


def _assert_parity(ours, theirs):
  scale = np.abs(theirs).max()
  assert scale > 0.1
  error = np.abs(ours - theirs).max() / scale
  print(f'max |ours - HuggingFace\'s| / max |HuggingFace\'s| = {error:.2g}')
  assert error <= 1e-5, error


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_imported_safetensors_give_huggingfaces_logits(saved, variant,
                                                       monkeypatch):
  """Each architecture: the same logits as HuggingFace's PyTorch model.

  Breaking the conversion (a kernel not transposed, a LayerNorm's epsilon
  1e-6 or a LayerNorm left out) moves the logits by 1e-4 to 1e0 of their
  scale, far outside 1e-5.
  """
  model, folder = saved[variant]
  source = importer.read(str(folder), image_size=IMAGE_SIZE)
  assert source.variant == variant
  assert source.description['weights'] == 'model.safetensors'
  images = _images()
  _assert_parity(_logits(source, images),
                 _hf_logits(model, images, monkeypatch))


def test_a_pytorch_bin_imports_as_safetensors_do(saved, tmp_path,
                                                 monkeypatch):
  model, _ = saved['conv']
  folder = _save(model, tmp_path / 'bin', safe=False)
  assert (folder / 'pytorch_model.bin').exists()
  assert not (folder / 'model.safetensors').exists()
  source = importer.read(str(folder), image_size=IMAGE_SIZE)
  assert source.description['weights'] == 'pytorch_model.bin'
  images = _images(seed=1)
  _assert_parity(_logits(source, images),
                 _hf_logits(model, images, monkeypatch))


def test_a_pytorch_bin_without_torch_is_refused_in_one_paragraph(
    saved, tmp_path, monkeypatch):
  model, _ = saved['fourier']
  folder = _save(model, tmp_path / 'bin', safe=False)
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` fails.
  with pytest.raises(errors.InputError) as e:
    importer.read(str(folder), image_size=IMAGE_SIZE)
  message = str(e.value)
  assert 'needs torch, which is not installed' in message
  assert 'model.safetensors' in message and '\n' not in message


def _with_config(folder, tmp_path, **changes):
  """A copy of `folder` whose config.json has `changes`."""
  copy = tmp_path / 'edited'
  copy.mkdir()
  for f in folder.iterdir():
    (copy / f.name).write_bytes(f.read_bytes())
  hf_config = json.loads((folder / 'config.json').read_text())
  hf_config.update(changes)
  (copy / 'config.json').write_text(json.dumps(hf_config))
  return copy


def test_weights_of_another_architecture_are_refused_by_name(saved, tmp_path):
  """Fourier weights under a conv config: the first misfit is named."""
  _, folder = saved['fourier']
  edited = _with_config(folder, tmp_path, architectures=[
      'PerceiverForImageClassificationConvProcessing'])
  with pytest.raises(errors.InputError) as e:
    importer.read(str(edited), image_size=IMAGE_SIZE)
  message = str(e.value)
  assert ('model.safetensors does not hold the model its config.json '
          'describes: perceiver.encoder.cross_attention.attention.output.'
          'dense.weight has shape (32, 261), expected (32, 322)') in message
  assert '\n' not in message


def test_a_missing_parameter_is_named(saved):
  model, _ = saved['learned']
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  del state['perceiver.decoder.decoder.final_layer.bias']
  hf_config = model.config.to_dict()
  _, fields = huggingface.config_fields(hf_config, IMAGE_SIZE)
  with pytest.raises(errors.InputError, match=(
      r'perceiver.decoder.decoder.final_layer.bias \(shape \(10,\)\) is '
      'missing')):
    huggingface.hf_to_params(state, ml_collections.ConfigDict(fields),
                             CLASSES)


def test_unsupported_settings_are_refused(saved, tmp_path):
  _, folder = saved['conv']
  edited = _with_config(folder, tmp_path, qk_channels=16)
  with pytest.raises(errors.InputError, match='qk_channels=16'):
    importer.read(str(edited))


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_the_config_builds_huggingfaces_parameter_count(variant):
  """configs/imagenet_perceiver_io.py against HuggingFace's model of the
  published config (on torch's meta device: nothing is allocated)."""
  published = dict(imagenet_perceiver_io.PUBLISHED[variant])
  name = published.pop('architectures')[0]
  with torch.device('meta'):
    hf_model = getattr(transformers, name)(
        transformers.PerceiverConfig(**published))
  theirs = sum(p.numel() for p in hf_model.parameters())
  # The BatchNorm's running statistics are parameters here (frozen).
  theirs += sum(b.numel() for n, b in hf_model.named_buffers()
                if n.endswith(('running_mean', 'running_var')))
  config = imagenet_perceiver_io.get_config(variant)
  model = perceiver.create_model(config, 1000)
  size = config.image_size
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, size, size, 3), np.float32),
      train=False))
  ours = sum(x.size for x in jax.tree.leaves(shapes['params']))
  assert ours == theirs
  written = {'learned': 62_255_848, 'fourier': 48_440_627,
             'conv': 48_646_650}[variant]  # The config's docstring.
  assert ours == written


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_an_imported_published_config_is_the_config_file(variant):
  """HuggingFace's whole config.json (defaults written out) reads into the
  model fields configs/imagenet_perceiver_io.py sets."""
  published = dict(imagenet_perceiver_io.PUBLISHED[variant])
  hf_config = transformers.PerceiverConfig(**published).to_dict()
  _, fields = huggingface.config_fields(hf_config)
  config = imagenet_perceiver_io.get_config(variant)
  for name, value in fields.items():
    assert config[name] == value, name
  assert config.image_size == 224
