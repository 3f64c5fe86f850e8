"""HuggingFace's three Perceiver IO classifiers, small and random, and the
haiku `.pystate` pickle each would have been converted from.

The pickle is what DeepMind's files hold: a dict of `params` and `state`,
each a haiku `FlatMap` of `FlatMap`s of numpy arrays, pickled by haiku
itself (its FlatMap pickles as a call of
`haiku._src.data_structures.FlatMapping` with a plain dict).
"""

import pickle

from haiku._src import data_structures as haiku_data_structures
import numpy as np
import torch
import transformers

from perceiver_jax.convert import haiku

# What each classifier fixes: its d_model is the width of its inputs
# (HuggingFace builds the preprocessing with DeepMind's channel counts).
D_MODEL = {'learned': 512, 'fourier': 261, 'conv': 322}
SMALL = dict(num_latents=8, d_latents=24, num_blocks=2,
             num_self_attends_per_block=2, num_self_attention_heads=2,
             num_cross_attention_heads=1, image_size=16, num_labels=10)


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


def pickle_bytes(checkpoint, protocol=pickle.DEFAULT_PROTOCOL):
  """A nested haiku checkpoint pickled as haiku's FlatMaps pickle."""
  flat_map = haiku_data_structures.FlatMap
  return pickle.dumps(
      {part: flat_map({scope: flat_map(arrays)
                       for scope, arrays in tree.items()})
       for part, tree in checkpoint.items()}, protocol=protocol)


def write_pystate(path, hf_state_dict, protocol=pickle.DEFAULT_PROTOCOL):
  """Writes the haiku checkpoint of a HuggingFace state dict to `path`."""
  path.write_bytes(pickle_bytes(haiku.to_haiku(hf_state_dict), protocol))
  return path


def flat(checkpoint):
  """`{'scope/name': array}` of a nested haiku checkpoint, params and state."""
  return {f'{scope}/{name}': np.asarray(array)
          for tree in checkpoint.values()
          for scope, arrays in tree.items() for name, array in arrays.items()}
