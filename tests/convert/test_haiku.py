"""The haiku <-> HuggingFace table of the Perceiver IO classifiers.

Two checks: a HuggingFace model's weights survive the trip to the haiku
checkpoint and back exactly, through a pickle and the safe reader; and
haiku's own module (hk.Linear, hk.Conv2D, hk.LayerNorm, hk.BatchNorm) given
the haiku arrays computes what the torch module computes with the
HuggingFace ones. A wrong transpose or reshape in `haiku.LAYOUTS`, or a
scale/offset swap, fails the second although the round trip, which applies
it both ways, passes.
"""

import collections
import functools
import os

import haiku as hk
import numpy as np
import pytest
import torch

from perceiver_jax import errors
from perceiver_jax.convert import haiku
from perceiver_jax.convert import pystate
from tests.convert import haiku_checkpoints

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


@pytest.fixture(scope='module')
def models():
  return {v: haiku_checkpoints.hf_model(v) for v in haiku.VARIANTS}


@pytest.mark.parametrize('variant', haiku.VARIANTS)
def test_round_trip_through_a_pystate_is_exact(tmp_path, models, variant):
  want = haiku_checkpoints.state_dict(models[variant])
  path = haiku_checkpoints.write_pystate(tmp_path / 'c.pystate', want)
  found, got = haiku.to_hf(pystate.read(path), source=str(path))
  assert found == variant
  assert sorted(got) == sorted(want)
  for name, array in want.items():
    assert (got[name].shape, got[name].dtype) == (array.shape, array.dtype), \
        name
    np.testing.assert_array_equal(got[name], array, err_msg=name)


def _haiku_module(torch_module):
  """(haiku's module computing what `torch_module` does, its default name,
  an input for both, NHWC for images)."""
  rng = np.random.default_rng(0)
  if isinstance(torch_module, torch.nn.Linear):
    return (lambda: hk.Linear(torch_module.out_features), 'linear',
            rng.normal(size=(5, torch_module.in_features)))
  if isinstance(torch_module, torch.nn.Conv2d):
    # Unpadded whatever padding the module adds; height != width.
    return (lambda: hk.Conv2D(
        torch_module.out_channels, torch_module.kernel_size, padding='VALID',
        with_bias=torch_module.bias is not None), 'conv2_d',
            rng.normal(size=(2, 9, 11, torch_module.in_channels)))
  if isinstance(torch_module, torch.nn.LayerNorm):
    return (lambda: hk.LayerNorm(-1, True, True, eps=torch_module.eps),
            'layer_norm', rng.normal(size=(5, *torch_module.normalized_shape)))
  if isinstance(torch_module, torch.nn.BatchNorm2d):
    return (lambda: functools.partial(hk.BatchNorm(
        True, True, 0.9, eps=torch_module.eps), is_training=False),
            'batch_norm', rng.normal(size=(2, 4, 5, torch_module.num_features)))
  raise AssertionError(f'no haiku counterpart for {torch_module}')


def _torch_output(torch_module, x):
  x = torch.from_numpy(x)
  if x.ndim == 4:  # NHWC -> NCHW and back.
    x = x.permute(0, 3, 1, 2)
  if isinstance(torch_module, torch.nn.Conv2d):
    y = torch.nn.functional.conv2d(x, torch_module.weight, torch_module.bias)
  else:
    y = torch_module(x)
  return (y.permute(0, 2, 3, 1) if y.ndim == 4 else y).detach().numpy()


def _haiku_output(make, name, entries, flat, x):
  """The haiku module's output with the checkpoint's arrays of `entries`
  (one module's), renamed as the module's default name holds them."""
  module = os.path.commonprefix(
      [e.haiku for e in entries if not e.state]).rsplit('/', 1)[0]
  params, state = {}, {}
  for entry in entries:
    relative = entry.haiku[len(module) + 1:]
    if relative.startswith('~/'):  # A submodule's state: ~/mean_ema/average
      submodule, leaf = relative.rsplit('/', 1)
      state.setdefault(f'{name}/{submodule}', {})[leaf] = flat[entry.haiku]
    else:
      params.setdefault(name, {})[relative] = flat[entry.haiku]
  apply = hk.transform_with_state(lambda x: make()(x)).apply
  return np.asarray(apply(params, state, None, x)[0])


def mismatches(model):
  """HuggingFace modules whose output differs from that of haiku's module
  given the haiku arrays `haiku.to_haiku` makes of their weights, and the
  HuggingFace names the comparison covered."""
  state = haiku_checkpoints.state_dict(model)
  checkpoint = haiku.to_haiku(state)
  flat = haiku_checkpoints.flat(checkpoint)
  entries = haiku.table(*haiku._hf_layout(state))  # pylint: disable=protected-access
  by_module = collections.defaultdict(list)
  for entry in entries:
    by_module[entry.hf.rsplit('.', 1)[0]].append(entry)
  wrong, covered = [], set()
  for name, module_entries in sorted(by_module.items()):
    torch_module = model.get_submodule(name)
    if not isinstance(torch_module, (torch.nn.Linear, torch.nn.Conv2d,
                                     torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
      continue
    make, haiku_name, x = _haiku_module(torch_module)
    x = x.astype(np.float32)
    want = _torch_output(torch_module, x)
    try:
      got = _haiku_output(make, haiku_name, module_entries, flat, x)
    except (ValueError, TypeError):  # Shapes haiku refuses.
      got = None
    if got is None or got.shape != want.shape or not np.allclose(
        got, want, rtol=1e-4, atol=1e-4):
      wrong.append(name)
    covered |= {e.hf for e in module_entries}
  return wrong, covered


@pytest.mark.parametrize('variant', haiku.VARIANTS)
def test_each_haiku_array_computes_what_huggingface_computes(models, variant):
  model = models[variant]
  wrong, covered = mismatches(model)
  assert not wrong
  # Every kernel, bias, norm and statistic was compared; what is left is
  # used as it is (latents, position embeddings).
  left = set(model.state_dict()) - covered
  assert all(n.endswith(('embeddings.latents', 'position_embeddings',
                         'num_batches_tracked')) for n in left), left


def test_the_check_catches_a_wrong_transpose(models, monkeypatch):
  # HuggingFace's conversion script reverses every axis of a kernel, which
  # swaps a conv kernel's height and width; the 1x1 kernel cannot tell.
  reversed_axes = haiku.LAYOUTS['conv']._replace(
      to_hf=np.transpose, to_haiku=np.transpose)
  monkeypatch.setitem(haiku.LAYOUTS, 'conv', reversed_axes)
  assert mismatches(models['conv'])[0] == [
      'perceiver.input_preprocessor.convnet.conv']
  assert not mismatches(models['learned'])[0]
  # A linear kernel left untransposed (as for a square one).
  monkeypatch.setitem(haiku.LAYOUTS, 'linear', haiku.LAYOUTS['linear']._replace(
      to_hf=np.asarray, to_haiku=np.asarray))
  wrong = mismatches(models['fourier'])[0]
  assert 'perceiver.encoder.self_attends.0.attention.self.query' in wrong


def test_refuses_other_checkpoints(models):
  checkpoint = haiku.to_haiku(haiku_checkpoints.state_dict(models['conv']))
  flat = {part: {f'{s}/{n}': a for s, d in tree.items() for n, a in d.items()}
          for part, tree in checkpoint.items()}
  extra = {**flat, 'params': {**flat['params'], 'head/linear/w': np.ones(2)}}
  with pytest.raises(errors.InputError, match=r'has head/linear/w, which'):
    haiku.to_hf(extra, 'x.pystate')
  name = 'perceiver_encoder/~/cross_attention/mlp/linear/b'
  lacking = {**flat, 'params': {k: v for k, v in flat['params'].items()
                                if k != name}}
  with pytest.raises(errors.InputError, match=f'read as the conv one.*lacks '
                     f'{name}'):
    haiku.to_hf(lacking, 'x.pystate')
  name = 'perceiver_encoder/~/cross_attention/mlp/linear/w'
  flipped = {**flat, 'params': {**flat['params'], name: np.ones(3)}}
  with pytest.raises(errors.InputError,
                     match=rf'{name} has shape \[3\], not haiku\'s \[in, '):
    haiku.to_hf(flipped, 'x.pystate')
