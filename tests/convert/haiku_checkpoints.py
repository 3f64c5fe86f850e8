"""HuggingFace's three Perceiver IO classifiers, small and random, and the
haiku `.pystate` pickle each would have been converted from.

The pickle is written as haiku wrote DeepMind's: a dict of `params` and
`state`, each haiku's `FlatMapping` of `FlatMapping`s of numpy arrays,
which pickles as a call of `haiku._src.data_structures.FlatMapping` with a
plain dict. haiku is not installed: a stand-in class under that name makes
pickle write the same opcodes.
"""

import pickle
import sys
import types

import numpy as np
import torch
import transformers

from perceiver_jax.convert import haiku

# What each classifier fixes: its d_model is the width of its inputs
# (HuggingFace builds the preprocessing with DeepMind's channel counts).
D_MODEL = {'learned': 512, 'fourier': 261, 'conv': 322}
SMALL = dict(num_latents=8, d_latents=24, num_blocks=2,
             num_self_attends_per_block=2, num_self_attention_heads=2,
             num_cross_attention_heads=1, cross_attention_widening_factor=2,
             self_attention_widening_factor=3, image_size=16, num_labels=10)


def hf_model(variant, seed=0, **config):
  """A `variant` classifier (`haiku.HF_CLASSES`) in eval mode, every weight
  and statistic random (the default init has layer norms of 1 and 0, which
  would hide a scale/offset mix-up)."""
  torch.manual_seed(seed)
  fields = {**SMALL, 'd_model': D_MODEL[variant], **config}
  model = getattr(transformers, haiku.HF_CLASSES[variant])(
      transformers.PerceiverConfig(**fields)).eval()
  with torch.no_grad():
    for name, value in model.state_dict().items():
      if name.endswith('num_batches_tracked'):
        value.fill_(1234)
      elif name.endswith('running_var'):
        value.copy_(torch.rand_like(value) + 0.5)
      else:
        value.copy_(torch.randn_like(value) * 0.3)
  return model


def state_dict(model):
  """`{name: numpy array}` of a torch model."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


class FlatMapping(dict):
  """Pickles as haiku's FlatMapping did: FlatMapping(plain dict)."""

  def __reduce__(self):
    return FlatMapping, (dict(self),)


FlatMapping.__module__ = 'haiku._src.data_structures'


def _flat_mappings(tree):
  return FlatMapping({scope: FlatMapping(arrays)
                      for scope, arrays in tree.items()})


def pickle_bytes(obj, protocol=pickle.DEFAULT_PROTOCOL):
  """`obj` pickled with FlatMapping under haiku's module name."""
  names = ('haiku', 'haiku._src', 'haiku._src.data_structures')
  saved = {n: sys.modules.get(n) for n in names}
  module = types.ModuleType(names[-1])
  module.FlatMapping = FlatMapping
  sys.modules.update({n: types.ModuleType(n) for n in names[:-1]})
  sys.modules[names[-1]] = module
  try:
    return pickle.dumps(obj, protocol=protocol)
  finally:
    for name, old in saved.items():
      if old is None:
        del sys.modules[name]
      else:
        sys.modules[name] = old


def write_pystate(path, hf_state_dict, protocol=pickle.DEFAULT_PROTOCOL):
  """Writes the haiku checkpoint of a HuggingFace state dict to `path`."""
  checkpoint = haiku.to_haiku(hf_state_dict)
  path.write_bytes(pickle_bytes(
      {part: _flat_mappings(tree) for part, tree in checkpoint.items()},
      protocol))
  return path


def flat(checkpoint):
  """`{'scope/name': array}` of a nested haiku checkpoint, params and state."""
  return {f'{scope}/{name}': np.asarray(array)
          for tree in checkpoint.values()
          for scope, arrays in tree.items() for name, array in arrays.items()}
