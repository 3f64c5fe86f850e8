"""The haiku <-> HuggingFace table of the Perceiver IO classifiers.

Two checks: a HuggingFace model's weights survive the trip to the haiku
checkpoint and back exactly, through a pickle and the safe reader; and each
haiku array computes, by haiku's definition of its module, what the torch
module computes with the HuggingFace array (so a wrong transpose or reshape
in `haiku.LAYOUTS` fails the second even though the round trip, which
applies it both ways, passes).
"""

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


# Haiku's modules in numpy, NHWC, as haiku defines them.
def _hk_linear(x, p):
  return x @ p['w'] + p['b']


def _hk_conv(x, p):
  """hk.Conv2D, stride 1, VALID: cross-correlation with an HWIO kernel."""
  w = p['w']
  windows = np.lib.stride_tricks.sliding_window_view(
      x, w.shape[:2], axis=(1, 2))  # [n, y, x, c, kh, kw]
  return np.einsum('nyxcij,ijco->nyxo', windows, w) + p.get('b', 0)


def _hk_layer_norm(x, p, eps):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['offset']


def _hk_batch_norm(x, p, eps):
  """hk.BatchNorm at inference: the moving averages' statistics."""
  return ((x - p['~/mean_ema/average']) /
          np.sqrt(p['~/var_ema/average'] + eps) * p['scale'] + p['offset'])


def _haiku_arrays(checkpoint, entries, hf_module):
  """{haiku parameter name relative to its module: array} of the entries
  whose HuggingFace names are `hf_module`'s."""
  flat = haiku_checkpoints.flat(checkpoint)
  mine = [e for e in entries if e.hf.rsplit('.', 1)[0] == hf_module
          and haiku.LAYOUTS[e.kind].to_hf is not None]
  module = mine[0].haiku.rsplit('/', 1)[0]
  if module.endswith('~/mean_ema') or module.endswith('~/var_ema'):
    module = module.rsplit('/', 2)[0]
  return {e.haiku[len(module) + 1:]: flat[e.haiku] for e in mine}


def _compared(torch_module, rng):
  """(NHWC or [n, features] input, the torch module's output on it, the
  haiku module's function of (input, haiku arrays))."""
  def torch_nhwc(x):
    y = torch_module(torch.from_numpy(x).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).detach().numpy()
  if isinstance(torch_module, torch.nn.Linear):
    x = rng.normal(size=(5, torch_module.in_features)).astype(np.float32)
    return x, torch_module(torch.from_numpy(x)).detach().numpy(), _hk_linear
  if isinstance(torch_module, torch.nn.Conv2d):
    # Unpadded, whatever padding the module adds; height != width.
    x = rng.normal(size=(2, 9, 11, torch_module.in_channels))
    x = x.astype(np.float32)
    y = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                   torch_module.weight, torch_module.bias)
    return x, y.permute(0, 2, 3, 1).detach().numpy(), _hk_conv
  if isinstance(torch_module, torch.nn.LayerNorm):
    x = rng.normal(size=(5, *torch_module.normalized_shape))
    x = x.astype(np.float32)
    return x, torch_module(torch.from_numpy(x)).detach().numpy(), (
        lambda x, p: _hk_layer_norm(x, p, torch_module.eps))
  if isinstance(torch_module, torch.nn.BatchNorm2d):
    x = rng.normal(size=(2, 4, 5, torch_module.num_features))
    x = x.astype(np.float32)
    return x, torch_nhwc(x), (
        lambda x, p: _hk_batch_norm(x, p, torch_module.eps))
  raise AssertionError(f'no haiku counterpart for {torch_module}')


def mismatches(model):
  """HuggingFace modules whose output differs from their haiku module's,
  and the names of the table's entries the comparison covered."""
  rng = np.random.default_rng(0)
  state = haiku_checkpoints.state_dict(model)
  checkpoint = haiku.to_haiku(state)
  entries = haiku.table(*haiku._hf_layout(state))  # pylint: disable=protected-access
  modules = sorted({e.hf.rsplit('.', 1)[0] for e in entries
                    if e.kind in ('linear', 'conv', 'bn')
                    or e.hf.endswith(('layernorm1.weight', 'layernorm2.weight',
                                      'layernorm.weight'))})
  wrong, covered = [], set()
  for name in modules:
    torch_module = model.get_submodule(name)
    p = _haiku_arrays(checkpoint, entries, name)
    covered |= {e.hf for e in entries if e.hf.rsplit('.', 1)[0] == name}
    x, want, haiku_module = _compared(torch_module, rng)
    try:
      got = haiku_module(x, p)
    except ValueError:  # Shapes that do not multiply.
      got = None
    if got is None or got.shape != want.shape or not np.allclose(
        got, want, rtol=1e-4, atol=1e-4):
      wrong.append(name)
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
