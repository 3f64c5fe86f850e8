"""DeepMind's haiku names for the Perceiver IO classifiers, as HuggingFace's.

DeepMind released three ImageNet classifiers as haiku checkpoints
(`pystate.py` reads them); HuggingFace converted them to
`PerceiverForImageClassificationLearned`, `...Fourier` and
`...ConvProcessing` with `convert_perceiver_haiku_to_pytorch.py`, and this
project imports that naming. `table()` is the correspondence, one `Entry` a
weight, with the layout change between the two (`LAYOUTS`); `to_hf` maps a
checkpoint through it and `to_haiku` back, so a HuggingFace state dict
becomes the checkpoint haiku would have written.

Names and layouts follow that script, with one exception: it transposes
every kernel with `np.transpose` (all axes reversed), which turns haiku's
[height, width, in, out] conv kernel into torch's [out, in, width, height],
its spatial axes swapped; `conv` here keeps them ([out, in, height, width],
what torch's Conv2d computes with). It matters for the 7x7 kernel of the
conv classifier only.
"""

import re
from typing import Callable, NamedTuple

import numpy as np

from perceiver_jax import errors

# The three classifiers by their input preprocessing.
VARIANTS = ('learned', 'fourier', 'conv')
HF_CLASSES = {
    'learned': 'PerceiverForImageClassificationLearned',
    'fourier': 'PerceiverForImageClassificationFourier',
    'conv': 'PerceiverForImageClassificationConvProcessing',
}


class Layout(NamedTuple):
  """How one kind of weight is laid out in haiku and in HuggingFace.

  Attributes:
    haiku_shape: its haiku shape, in words, for errors.
    fits: whether a haiku shape is of this layout.
    to_hf: haiku array -> HuggingFace array; None for what HuggingFace's
      model does not use (dropped on the way there).
    to_haiku: the HuggingFace array of the entry -> haiku array.
  """
  haiku_shape: str
  fits: Callable[[tuple[int, ...]], bool]
  to_hf: Callable[[np.ndarray], np.ndarray] | None
  to_haiku: Callable[[np.ndarray], np.ndarray]


def _bn_channels(a):
  return a.reshape(1, 1, 1, -1)


LAYOUTS = {
    # Biases, layer norms, latents, position embeddings: as they are.
    'same': Layout('any', lambda s: True, np.asarray, np.asarray),
    # hk.Linear's w is [in, out] (x @ w); torch's Linear weight [out, in].
    'linear': Layout('[in, out]', lambda s: len(s) == 2,
                     np.transpose, np.transpose),
    # hk.Conv2D's w is HWIO; torch's Conv2d weight OIHW.
    'conv': Layout('[height, width, in, out]', lambda s: len(s) == 4,
                   lambda a: a.transpose(3, 2, 0, 1),
                   lambda a: a.transpose(2, 3, 1, 0)),
    # hk.BatchNorm's scale, offset and statistics keep the input's rank,
    # [1, 1, 1, channels]; torch's BatchNorm2d has [channels].
    'bn': Layout('[1, 1, 1, channels]',
                 lambda s: len(s) == 4 and s[:3] == (1, 1, 1),
                 lambda a: a.reshape(-1), _bn_channels),
    # The moving averages' update count: int32 in haiku, torch's
    # num_batches_tracked int64.
    'counter': Layout('[] (a count)', lambda s: s == (),
                      lambda a: a.astype(np.int64),
                      lambda a: a.astype(np.int32)),
    # hk.ExponentialMovingAverage's un-debiased `hidden` value and the
    # variance's own counter: inference reads neither. Rebuilt from the
    # entry's HuggingFace array (the statistic; the count).
    'unused_bn': Layout('[1, 1, 1, channels]',
                        lambda s: len(s) == 4 and s[:3] == (1, 1, 1),
                        None, _bn_channels),
    'unused_counter': Layout('[] (a count)', lambda s: s == (), None,
                             lambda a: a.astype(np.int32)),
}


class Entry(NamedTuple):
  """One weight: its haiku name, HuggingFace name and `LAYOUTS` kind."""
  haiku: str
  hf: str
  kind: str
  state: bool = False  # In the checkpoint's `state` (haiku's hk.get_state).


# Attention blocks: haiku module -> HuggingFace module, then their layer
# norms. Haiku numbers a repeated module 'name', 'name_1', 'name_2', ...
_QUERY_KV_MLP_NORMS = (('layer_norm', 'attention.self.layernorm1'),
                       ('layer_norm_1', 'attention.self.layernorm2'),
                       ('layer_norm_2', 'layernorm'))
_SELF_NORMS = (('layer_norm', 'attention.self.layernorm1'),
               ('layer_norm_1', 'layernorm'))
_BLOCK_LINEARS = (('attention/linear', 'attention.self.query'),
                  ('attention/linear_1', 'attention.self.key'),
                  ('attention/linear_2', 'attention.self.value'),
                  ('attention/linear_3', 'attention.output.dense'),
                  ('mlp/linear', 'mlp.dense1'),
                  ('mlp/linear_1', 'mlp.dense2'))

_ENCODER = 'perceiver_encoder/~/'
_DECODER = 'classification_decoder/~/basic_decoder/'
_HF_DECODER = 'perceiver.decoder.decoder.'
_PRE = 'image_preprocessor/~/'
_HF_PRE = 'perceiver.input_preprocessor.'
_BN = _PRE + 'conv2_d_downsample/~/batchnorm/'
_HF_BN = _HF_PRE + 'convnet.batchnorm.'

_COMMON = (
    Entry(_ENCODER + 'trainable_position_encoding/pos_embs',
          'perceiver.embeddings.latents', 'same'),
    Entry(_DECODER + '~/trainable_position_encoding/pos_embs',
          _HF_DECODER + 'output_position_encodings.position_embeddings',
          'same'),
    Entry(_DECODER + 'output/w', _HF_DECODER + 'final_layer.weight',
          'linear'),
    Entry(_DECODER + 'output/b', _HF_DECODER + 'final_layer.bias', 'same'),
)

_PREPROCESSORS = {
    'learned': (
        Entry(_PRE + 'conv2_d/w', _HF_PRE + 'convnet_1x1.weight', 'conv'),
        Entry(_PRE + 'conv2_d/b', _HF_PRE + 'convnet_1x1.bias', 'same'),
        Entry('image_preprocessor/~_build_network_inputs/'
              'trainable_position_encoding/pos_embs',
              _HF_PRE + 'position_embeddings.position_embeddings', 'same'),
        Entry('image_preprocessor/~_build_network_inputs/'
              'position_encoding_projector/linear/w',
              _HF_PRE + 'positions_projection.weight', 'linear'),
        Entry('image_preprocessor/~_build_network_inputs/'
              'position_encoding_projector/linear/b',
              _HF_PRE + 'positions_projection.bias', 'same'),
    ),
    'fourier': (),  # Fourier features and pixels: nothing learned.
    'conv': (
        Entry(_PRE + 'conv2_d_downsample/~/conv/w',
              _HF_PRE + 'convnet.conv.weight', 'conv'),
        Entry(_BN + 'scale', _HF_BN + 'weight', 'bn'),
        Entry(_BN + 'offset', _HF_BN + 'bias', 'bn'),
        Entry(_BN + '~/mean_ema/average', _HF_BN + 'running_mean', 'bn',
              state=True),
        Entry(_BN + '~/var_ema/average', _HF_BN + 'running_var', 'bn',
              state=True),
        Entry(_BN + '~/mean_ema/counter', _HF_BN + 'num_batches_tracked',
              'counter', state=True),
        Entry(_BN + '~/mean_ema/hidden', _HF_BN + 'running_mean',
              'unused_bn', state=True),
        Entry(_BN + '~/var_ema/hidden', _HF_BN + 'running_var', 'unused_bn',
              state=True),
        Entry(_BN + '~/var_ema/counter', _HF_BN + 'num_batches_tracked',
              'unused_counter', state=True),
    ),
}


def _block(haiku, hf, norms):
  """The entries of one attention block (attention, MLP, layer norms)."""
  entries = []
  for haiku_linear, hf_linear in _BLOCK_LINEARS:
    entries += [Entry(f'{haiku}/{haiku_linear}/w', f'{hf}.{hf_linear}.weight',
                      'linear'),
                Entry(f'{haiku}/{haiku_linear}/b', f'{hf}.{hf_linear}.bias',
                      'same')]
  for haiku_norm, hf_norm in norms:
    entries += [Entry(f'{haiku}/{haiku_norm}/scale', f'{hf}.{hf_norm}.weight',
                      'same'),
                Entry(f'{haiku}/{haiku_norm}/offset', f'{hf}.{hf_norm}.bias',
                      'same')]
  return entries


def table(variant, num_self_attends):
  """Every `Entry` of a `variant` classifier whose latent Transformer has
  `num_self_attends` layers (HuggingFace's num_self_attends_per_block)."""
  entries = list(_PREPROCESSORS[variant]) + list(_COMMON)
  entries += _block(_ENCODER + 'cross_attention',
                    'perceiver.encoder.cross_attention', _QUERY_KV_MLP_NORMS)
  for i in range(num_self_attends):
    entries += _block(_ENCODER + 'self_attention' + (f'_{i}' if i else ''),
                      f'perceiver.encoder.self_attends.{i}', _SELF_NORMS)
  entries += _block(_DECODER + 'cross_attention',
                    _HF_DECODER + 'decoding_cross_attention',
                    _QUERY_KV_MLP_NORMS)
  return tuple(entries)


def _haiku_layout(names):
  """(variant, number of latent Transformer layers) of haiku names."""
  variant = ('learned' if _PRE + 'conv2_d/w' in names else
             'conv' if _PRE + 'conv2_d_downsample/~/conv/w' in names else
             'fourier')
  layers = {m.group(1) for m in map(re.compile(
      re.escape(_ENCODER) + r'(self_attention(_\d+)?)/').match, names) if m}
  return variant, len(layers)


def _hf_layout(names):
  """(variant, number of latent Transformer layers) of HuggingFace names."""
  variant = ('learned' if _HF_PRE + 'convnet_1x1.weight' in names else
             'conv' if _HF_PRE + 'convnet.conv.weight' in names else
             'fourier')
  layers = {m.group(1) for m in map(re.compile(
      r'perceiver\.encoder\.self_attends\.(\d+)\.').match, names) if m}
  return variant, len(layers)


def _listed(names, limit=5):
  names = sorted(names)
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def _check_names(have, want, source, variant):
  """Refuses `have` unless it is exactly the names `want`."""
  missing, unexpected = set(want) - set(have), set(have) - set(want)
  if missing or unexpected:
    problems = ([f'lacks {_listed(missing)}'] if missing else []) + (
        [f'has {_listed(unexpected)}, which it has not'] if unexpected else [])
    raise errors.InputError(
        f'{source}: not one of DeepMind\'s Perceiver IO ImageNet classifiers '
        f'(read as the {variant} one, {HF_CLASSES[variant]}): it '
        + ' and '.join(problems) + '. Import one of the three checkpoints '
        'README, "Perceiver IO\'s published weights", links, unchanged.')


def to_hf(checkpoint, source='the checkpoint'):
  """(variant, HuggingFace state dict) of a haiku classifier checkpoint.

  Args:
    checkpoint: `{'params': {name: array}, 'state': {name: array}}` with
      haiku's '/'-joined names (`pystate.read`).
    source: what the checkpoint is, for errors (its path).

  Returns:
    The variant ('learned', 'fourier' or 'conv') and `{HuggingFace name:
    numpy array}`, as HuggingFace's model of that variant names its state.
  """
  flat = {**checkpoint['params'], **checkpoint['state']}
  variant, layers = _haiku_layout(flat)
  entries = table(variant, layers)
  _check_names(flat, [e.haiku for e in entries], source, variant)
  out = {}
  for entry in entries:
    layout = LAYOUTS[entry.kind]
    array = np.asarray(flat[entry.haiku])
    part = 'state' if entry.state else 'params'
    if entry.haiku not in checkpoint[part]:
      raise errors.InputError(
          f'{source}: {entry.haiku} is in the checkpoint\'s '
          f'{"params" if entry.state else "state"}; haiku keeps it in its '
          f'{part}. Not a checkpoint DeepMind released.')
    if not layout.fits(array.shape):
      raise errors.InputError(
          f'{source}: {entry.haiku} has shape {list(array.shape)}, not '
          f'haiku\'s {layout.haiku_shape}. Not a checkpoint DeepMind '
          'released.')
    if layout.to_hf is not None:
      out[entry.hf] = layout.to_hf(array)
  return variant, out


def to_haiku(state_dict):
  """The haiku checkpoint of a HuggingFace classifier's state dict.

  The inverse of `to_hf`: `{'params': {module: {name: array}}, 'state':
  {...}}`, nested as haiku pickles it, for a state dict (`{name: numpy
  array}`) of one of the three `HF_CLASSES`.
  """
  variant, layers = _hf_layout(state_dict)
  entries = table(variant, layers)
  _check_names(state_dict, {e.hf for e in entries}, 'the state dict',
               variant)
  out = {'params': {}, 'state': {}}
  for entry in entries:
    module, name = entry.haiku.rsplit('/', 1)
    part = out['state' if entry.state else 'params']
    part.setdefault(module, {})[name] = LAYOUTS[entry.kind].to_haiku(
        np.asarray(state_dict[entry.hf]))
  return out


# What DeepMind's three classifiers share and their weights do not show
# (the configs their colab builds them with): the latent Transformer block
# is applied 8 times, with 8 heads, and the cross-attend has 1.
RELEASE = dict(num_blocks=8, num_self_attention_heads=8,
               num_cross_attention_heads=1)


def hf_config(variant, state_dict, release=None):
  """HuggingFace's `config.json` fields of the classifier `state_dict` is.

  Args:
    variant: 'learned', 'fourier' or 'conv' (`to_hf`'s).
    state_dict: its weights, HuggingFace's names (`to_hf`'s).
    release: the fields the weights do not show; default `RELEASE`.

  Returns:
    The fields a `PerceiverConfig` of that model has: sizes read from the
    shapes, the rest from `release`; the learned classifier's image size
    from its position table (one row per pixel).
  """
  shape = lambda name: np.shape(state_dict['perceiver.' + name])
  num_latents, d_latents = shape('embeddings.latents')
  layers = _hf_layout(state_dict)[1]
  config = dict(
      architectures=[HF_CLASSES[variant]], num_latents=num_latents,
      d_latents=d_latents,
      d_model=shape('encoder.cross_attention.attention.self.layernorm2.'
                    'weight')[0],
      num_self_attends_per_block=layers,
      num_labels=shape('decoder.decoder.final_layer.bias')[0],
      cross_attention_widening_factor=shape(
          'encoder.cross_attention.mlp.dense1.weight')[0] // d_latents,
      self_attention_widening_factor=shape(
          'encoder.self_attends.0.mlp.dense1.weight')[0] // d_latents
      if layers else 1,
      **(RELEASE if release is None else release))
  if variant == 'learned':
    pixels = shape('input_preprocessor.position_embeddings.'
                   'position_embeddings')[0]
    config['image_size'] = int(round(pixels**0.5))
  return config
