"""HuggingFace's Perceiver IO image classifiers -> this project's model.

HuggingFace's `PerceiverForImageClassificationLearned`, `...Fourier` and
`...ConvProcessing` (the `deepmind/vision-perceiver-{learned,fourier,conv}`
checkpoints) are this project's Perceiver with Perceiver IO's options:
`config_fields` reads their `config.json` into model fields, and
`hf_to_params` maps their weights onto the parameters. Both are pure
(numpy in, numpy out): the importer (`importer.py`) reads the files, and a
converter from another format can build the same `state_dict` and call
`hf_to_params`.

Input naming: `state_dict` maps HuggingFace's names, as
`model.state_dict()` and `save_pretrained` write them (`perceiver.` prefix,
e.g. `perceiver.encoder.self_attends.0.attention.self.query.weight`), to
numpy arrays in PyTorch's layouts: a Linear weight is `[out, in]`, a
convolution's `[out, in, height, width]`. BatchNorm's `num_batches_tracked`
may be present and is ignored.

Where HuggingFace's port computes differently from DeepMind's haiku code,
the imported model follows HuggingFace (it must give HuggingFace's logits):
its GELU is exact for `hidden_act='gelu'`; every LayerNorm's epsilon is
PyTorch's 1e-5 (`layer_norm_eps` in its config is not read by its model);
its conv stem pads the 7x7 convolution by 3 pixels on each side and not the
max-pool (a 55 x 55 grid for 224 x 224 images, haiku's SAME gives 56 x 56:
`conv_stem_padding='huggingface'`).
"""

import numpy as np

from perceiver_jax import errors

# HuggingFace's architecture -> (variant, model fields it fixes). Their
# preprocessors hard-code these sizes (modeling_perceiver.py).
ARCHITECTURES = {
    'PerceiverForImageClassificationLearned': ('learned', dict(
        preprocessor='conv1x1', preprocessor_channels=256,
        position_encoding='learned')),
    'PerceiverForImageClassificationFourier': ('fourier', dict(
        preprocessor='patches', position_encoding='fourier',
        fourier_num_bands=64, fourier_max_resolution=224,
        fourier_mode='concat')),
    'PerceiverForImageClassificationConvProcessing': ('conv', dict(
        preprocessor='conv', preprocessor_channels=64,
        position_encoding='fourier', fourier_num_bands=64,
        fourier_max_resolution=56, fourier_mode='concat',
        conv_stem_padding='huggingface')),
}
# hidden_act -> gelu_approximate (HuggingFace's ACT2FN names).
GELUS = {'gelu': False, 'gelu_new': True, 'gelu_pytorch_tanh': True}
# The image size the published Fourier and conv models were trained at
# (their Fourier features' max resolution is 224, and 56 after the stem).
PUBLISHED_IMAGE_SIZE = 224


def architecture(hf_config):
  """HuggingFace's class name in `config.json`, if it is one of ours."""
  names = hf_config.get('architectures') or []
  for name in names:
    if name in ARCHITECTURES:
      return name
  raise errors.InputError(
      f'The HuggingFace config names the architecture {names or "none"}; '
      'only Perceiver IO\'s image classifiers import: '
      + ', '.join(ARCHITECTURES) + ' (the deepmind/vision-perceiver-learned, '
      '-fourier and -conv checkpoints).')


def _check_supported(hf_config, name):
  """Refuses settings HuggingFace allows that this model cannot express."""
  get = hf_config.get
  problems = []
  if get('qk_channels') is not None or get('v_channels') is not None:
    problems.append(f'qk_channels={get("qk_channels")} and v_channels='
                    f'{get("v_channels")} (only null: q, k and v at the '
                    'inputs\' width in the cross-attention, the latents\' '
                    'in the self-attention)')
  if get('cross_attention_shape_for_attention', 'kv') != 'kv':
    problems.append('cross_attention_shape_for_attention='
                    f'{get("cross_attention_shape_for_attention")!r} '
                    "(only 'kv')")
  if not get('use_query_residual', True):
    problems.append('use_query_residual=false (only true)')
  if get('self_attention_widening_factor', 1) != get(
      'cross_attention_widening_factor', 1):
    problems.append('self_attention_widening_factor='
                    f'{get("self_attention_widening_factor")} differing from '
                    'cross_attention_widening_factor='
                    f'{get("cross_attention_widening_factor")} (one MLP '
                    'width serves both)')
  if get('hidden_act', 'gelu') not in GELUS:
    problems.append(f'hidden_act={get("hidden_act")!r} (only '
                    + ', '.join(repr(g) for g in GELUS) + ')')
  if problems:
    raise errors.InputError(
        f'This {name} cannot be imported: its config.json sets '
        + '; '.join(problems) + '. The published Perceiver IO classifiers '
        'use the defaults; import one of them, or a model fine-tuned from '
        'one without changing these.')


def config_fields(hf_config, image_size=None):
  """This project's model fields for a HuggingFace `config.json`.

  Args:
    hf_config: the parsed `config.json` (a dict).
    image_size: the input size; default: the learned model's `image_size`
      (its position table has one row per pixel), or 224 for the others,
      the size their Fourier features were made for.

  Returns:
    `(variant, fields)`: 'learned', 'fourier' or 'conv', and a dict of
    config fields (`perceiver.RULES`' names) that build that model.
  """
  name = architecture(hf_config)
  _check_supported(hf_config, name)
  variant, fixed = ARCHITECTURES[name]
  get = hf_config.get
  if image_size is None:
    image_size = (get('image_size', 56) if variant == 'learned' else
                  PUBLISHED_IMAGE_SIZE)
  width = get('d_latents', 1280)
  widening = get('self_attention_widening_factor', 1)
  fields = dict(
      image_size=image_size, patch_size=1,
      latent_dim=get('num_latents', 256), projection_dim=width,
      latent_init='truncated_normal',
      # One cross-attend, then num_blocks applications of one block of
      # num_self_attends_per_block layers.
      cross_attend='first_iteration', weight_sharing='all',
      num_iterations=get('num_blocks', 1),
      num_transformer_blocks=get('num_self_attends_per_block', 26),
      num_heads=get('num_self_attention_heads', 8), latent_head_width='split',
      num_cross_heads=get('num_cross_attention_heads', 8),
      cross_attention_width='input', cross_attention_residual='pre_norm',
      ffn_units=(width * widening, width),
      decoder='perceiver_io', classifier_units=(), logits_dropout=False,
      dropout_rate=0.0,
      attention_dropout_rate=float(get('attention_probs_dropout_prob', 0.1)),
      layer_norm_epsilon=1e-5, gelu_approximate=GELUS[get('hidden_act',
                                                          'gelu')],
      **fixed)
  return variant, fields


def num_labels(hf_config):
  """The classifier's output count HuggingFace's config declares."""
  labels = hf_config.get('id2label') or {}
  return int(hf_config.get('num_labels', len(labels) or 2))


def class_names(hf_config):
  """`id2label` in class order (ImageNet's names as people read them)."""
  labels = {int(k): v for k, v in (hf_config.get('id2label') or {}).items()}
  return [labels.get(i, str(i)) for i in range(num_labels(hf_config))]


# --------------------------------------------------------------------------
# The name table. Each entry: HuggingFace's name without 'perceiver.',
# this model's parameter path ('{i}': the self-attention layer, in both),
# and the layout change (`LAYOUTS`); a path of None is read and dropped.

def _attention_block(hf, ours, attention, query_norm, data_norm):
  """A PerceiverLayer (attention, its LayerNorms and MLP) -> a block."""
  rows = [
      (hf + 'attention.self.layernorm1.weight', ours + query_norm + '/scale',
       'copy'),
      (hf + 'attention.self.layernorm1.bias', ours + query_norm + '/bias',
       'copy'),
      (hf + 'attention.output.dense.weight', ours + attention +
       '/output/kernel', 'heads_out'),
      (hf + 'attention.output.dense.bias', ours + attention + '/output/bias',
       'copy'),
      (hf + 'layernorm.weight', ours + 'ffn_norm/scale', 'copy'),
      (hf + 'layernorm.bias', ours + 'ffn_norm/bias', 'copy'),
      (hf + 'mlp.dense1.weight', ours + 'ffn/dense_0/kernel', 'linear'),
      (hf + 'mlp.dense1.bias', ours + 'ffn/dense_0/bias', 'copy'),
      (hf + 'mlp.dense2.weight', ours + 'ffn/dense_1/kernel', 'linear'),
      (hf + 'mlp.dense2.bias', ours + 'ffn/dense_1/bias', 'copy'),
  ]
  for p in ('query', 'key', 'value'):
    rows += [(hf + f'attention.self.{p}.weight',
              ours + f'{attention}/{p}/kernel', 'heads_in'),
             (hf + f'attention.self.{p}.bias',
              ours + f'{attention}/{p}/bias', 'heads_bias')]
  if data_norm:
    rows += [(hf + 'attention.self.layernorm2.weight',
              ours + data_norm + '/scale', 'copy'),
             (hf + 'attention.self.layernorm2.bias',
              ours + data_norm + '/bias', 'copy')]
  return rows


NAME_TABLE = [
    ('embeddings.latents', 'latent_array', 'copy'),
    # 'conv1x1' (learned positions).
    ('input_preprocessor.convnet_1x1.weight',
     'conv1x1_encoder/projection/kernel', 'conv1x1'),
    ('input_preprocessor.convnet_1x1.bias', 'conv1x1_encoder/projection/bias',
     'copy'),
    ('input_preprocessor.position_embeddings.position_embeddings',
     'conv1x1_encoder/position_embedding', 'copy'),
    ('input_preprocessor.positions_projection.weight',
     'conv1x1_encoder/position_projection/kernel', 'linear'),
    ('input_preprocessor.positions_projection.bias',
     'conv1x1_encoder/position_projection/bias', 'copy'),
    # 'conv' (the convolutional stem).
    ('input_preprocessor.convnet.conv.weight', 'conv_encoder/conv/kernel',
     'conv'),
    ('input_preprocessor.convnet.batchnorm.weight',
     'conv_encoder/batch_norm/scale', 'copy'),
    ('input_preprocessor.convnet.batchnorm.bias',
     'conv_encoder/batch_norm/bias', 'copy'),
    ('input_preprocessor.convnet.batchnorm.running_mean',
     'conv_encoder/batch_norm/mean', 'copy'),
    ('input_preprocessor.convnet.batchnorm.running_var',
     'conv_encoder/batch_norm/var', 'copy'),
    ('input_preprocessor.convnet.batchnorm.num_batches_tracked', None, None),
    *_attention_block('encoder.cross_attention.', 'cross_attention/',
                      'attention', 'latent_norm', 'data_norm'),
    *_attention_block('encoder.self_attends.{i}.',
                      'latent_transformer/block_{i}/', 'self_attention',
                      'attention_norm', None),
    ('decoder.decoder.output_position_encodings.position_embeddings',
     'decoder/query', 'copy'),
    *_attention_block('decoder.decoder.decoding_cross_attention.',
                      'decoder/block/', 'attention', 'latent_norm',
                      'data_norm'),
    ('decoder.decoder.final_layer.weight', 'classifier/dense_0/kernel',
     'linear'),
    ('decoder.decoder.final_layer.bias', 'classifier/dense_0/bias', 'copy'),
]
PREFIX = 'perceiver.'

# Layout changes: (HuggingFace's array, our shape -> ours; our shape ->
# HuggingFace's shape).
LAYOUTS = {
    'copy': (lambda w, shape: w, lambda s: s),
    # Linear [out, in] -> Dense kernel [in, out].
    'linear': (lambda w, shape: w.T, lambda s: (s[1], s[0])),
    # Linear [heads * head_dim, in] -> [in, heads, head_dim]; HuggingFace
    # splits the channels head-major, as the kernel's axes are.
    'heads_in': (lambda w, shape: w.T.reshape(shape),
                 lambda s: (s[1] * s[2], s[0])),
    'heads_bias': (lambda w, shape: w.reshape(shape),
                   lambda s: (s[0] * s[1],)),
    # Linear [out, heads * head_dim] -> [heads, head_dim, out].
    'heads_out': (lambda w, shape: w.T.reshape(shape),
                  lambda s: (s[2], s[0] * s[1])),
    # Conv2d [out, in, height, width] -> [height, width, in, out].
    'conv': (lambda w, shape: w.transpose(2, 3, 1, 0),
             lambda s: (s[3], s[2], s[0], s[1])),
    # A 1x1 Conv2d [out, in, 1, 1] -> Dense kernel [in, out].
    'conv1x1': (lambda w, shape: w[:, :, 0, 0].T,
                lambda s: (s[1], s[0], 1, 1)),
}


def name_table(num_layers):
  """`{HuggingFace name: (path or None, layout)}` for a model whose block
  has `num_layers` self-attention layers."""
  table = {}
  for hf, ours, layout in NAME_TABLE:
    for i in range(num_layers) if '{i}' in hf else [None]:
      table[PREFIX + hf.format(i=i)] = (
          ours and ours.format(i=i), layout)
  return table


def expected_shapes(config, num_classes):
  """`{path: shape}` of the parameters of the model `config` builds."""
  # Here, so configs can read `config_fields` without importing jax.
  # pylint: disable=g-import-not-at-top
  import jax
  from perceiver_jax.model import perceiver
  # pylint: enable=g-import-not-at-top
  model = perceiver.create_model(config, num_classes)
  image = np.zeros((1, config.image_size, config.image_size, 3), np.float32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), image, train=False))['params']
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {'/'.join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in flat}


def _misfit(what, source):
  return errors.InputError(
      f'{source} does not hold the model its config.json describes: {what}. '
      'Is the weights file from another model? The folder must hold one '
      'checkpoint\'s config.json and weights, as save_pretrained writes '
      'them.')


OUTPUT_LAYER = PREFIX + 'decoder.decoder.final_layer.weight'


def hf_to_params(state_dict, config, num_classes=None,
                 source='The checkpoint'):
  """This model's parameters from HuggingFace's weights (module doc).

  Args:
    state_dict: HuggingFace's parameter names -> numpy arrays (see the
      module doc for the naming and layouts).
    config: a ConfigDict of this project whose model fields describe the
      same network (e.g. from `config_fields`).
    num_classes: the classifier's output count; default: the rows of
      `OUTPUT_LAYER`.
    source: how error messages name the checkpoint.

  Returns:
    A nested dict of float32 numpy arrays, `model.init(...)['params']`'s
    structure.

  Raises:
    errors.InputError: naming the first parameter that does not fit: a
      name this model has no place for, a shape other than expected, or
      a parameter the model needs and the checkpoint lacks.
  """
  if num_classes is None:
    if OUTPUT_LAYER not in state_dict:
      raise _misfit(f'{OUTPUT_LAYER} (the classifier) is missing', source)
    num_classes = np.shape(state_dict[OUTPUT_LAYER])[0]
  expected = expected_shapes(config, num_classes)
  table = {name: entry for name, entry in
           name_table(config.num_transformer_blocks).items()
           if entry[0] is None or entry[0] in expected}
  params = {}
  for name in sorted(state_dict):
    array = np.asarray(state_dict[name])
    if name not in table:
      raise _misfit(f'{name} (shape {array.shape}) has no place in this '
                    'model', source)
    path, layout = table[name]
    if path is None:
      continue
    to_ours, hf_shape = LAYOUTS[layout]
    want = tuple(hf_shape(expected[path]))
    if array.shape != want:
      raise _misfit(f'{name} has shape {array.shape}, expected {want}',
                    source)
    params[path] = np.asarray(to_ours(array, expected[path]), np.float32)
  for name, (path, layout) in sorted(table.items()):
    if path is not None and path not in params:
      raise _misfit(f'{name} (shape {LAYOUTS[layout][1](expected[path])}) '
                    'is missing', source)
  unnamed = sorted(set(expected) - set(params))
  if unnamed:  # A parameter the table does not know: a bug, not bad input.
    raise ValueError(f'No HuggingFace name maps to {unnamed}.')
  nested = {}
  for path, array in params.items():
    node = nested
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = array
  return nested
