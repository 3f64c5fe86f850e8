"""Model FLOPs of the Perceiver: counted by hand, and as XLA counts them.

`analytic_flops_per_example` counts every matmul of the forward pass (2 FLOPs
per multiply-add), the usual MFU convention; `xla_cost` reads XLA's cost
analysis of a compiled program, which also counts elementwise work. Imports
neither tensorflow nor tfds.
"""

from perceiver_jax.model import perceiver
from perceiver_jax.model import position_encoding as position_lib
from perceiver_jax.model import sharing

CHANNELS = 3  # RGB, unless told otherwise.


def _dense_chain_flops(rows, widths):
  """Matmul FLOPs of Dense layers widths[0] -> widths[1] -> ... on `rows`."""
  return sum(2 * rows * a * b for a, b in zip(widths[:-1], widths[1:]))


def attention_flops(folded, q_length, kv_length, d_q, d_kv, d_out,
                    num_heads, head_dim):
  """Forward matmul FLOPs of one attention call on one example, by part.

  The factored form (Keras' order) projects queries, keys and values per
  head, attends and projects out (`d_out=0`: no output projection, the
  seed's cross-attention); the folded form (`folded.folded_attention`)
  attends over the unprojected keys and values with `W_q W_k^T` and
  `W_v W_o`, whose own products ('weights', once per call on the whole
  batch) are left to the caller to spread over the examples.
  """
  if folded:
    return dict(
        query=2 * q_length * d_q * num_heads * d_kv, key_value=0,
        attention=2 * 2 * num_heads * q_length * kv_length * d_kv,
        output=2 * q_length * num_heads * d_kv * d_out,
        weights=2 * num_heads * head_dim * (d_q * d_kv + d_kv * d_out))
  return dict(
      query=2 * q_length * d_q * num_heads * head_dim,
      key_value=2 * 2 * kv_length * d_kv * num_heads * head_dim,
      attention=2 * 2 * num_heads * q_length * kv_length * head_dim,
      output=2 * q_length * num_heads * head_dim * d_out, weights=0)


def analytic_flops_per_example(config, num_classes, channels=CHANNELS,
                               batch_size=None):
  """Matmul FLOPs of one example's forward pass, by part (2 per multiply-add).

  Counts what dominates and what MFU conventionally counts: the patch
  projection (with any Fourier features), q/k/v projections, attention
  logits and weighted sums, output projections, FFNs, the query decoder and
  the classifier. Everything elementwise (LayerNorm, GELU, softmax, dropout,
  residuals, the Fourier features themselves, the augmentation) is left out.

  The cross-attention's keys and values are projections of the same data
  array, so iterations that share the cross-attention's weights share them:
  XLA computes them once per cross-attention weight set (common
  subexpression elimination), even though the model's code asks for them in
  every iteration; their gradients, though, are computed once per iteration
  (autodiff differentiates every call). 'data_key_value' counts them so that
  3x the forward is the step's total, spread over the examples.
  'as_written_total' is the forward pass as the code is written: keys and
  values in every iteration, Keras' factored order throughout, every matmul
  the code asks for (the convention of the Perceiver paper's FLOP counts).

  Every attention is counted in the form it runs in (`config.attention_form`,
  'auto' deciding at `batch_size`): the matmuls the device executes, so MFU
  is not flattered by the folded form. The folded form's per-head weight
  products (`W_q W_k^T`, `W_v W_o`) are paid once per step and appear
  spread over the batch ('weight_folding' per latent block and iteration,
  'cross_weight_folding' per iteration). The factored (Keras-order) count is
  returned as 'factored_total' either way.

  Args:
    config: a model config (see configs/cifar100.py).
    num_classes: logits width.
    channels: image channels.
    batch_size: the batch the step runs (default config.batch_size).

  Returns:
    dict of FLOPs per part, with the sum under 'total'.
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  model = perceiver.create_model(config, num_classes)
  d, n, m = model.projection_dim, model.latent_dim, model.num_patches
  t_max = model.num_iterations
  ffn = (d,) + tuple(model.ffn_units)
  patch_values = model.patch_size**2 * channels
  fourier = position_lib.num_fourier_features(2, model.fourier_num_bands)
  stem = model.preprocessor_channels
  if model.preprocessor == 'conv1x1':
    # Pixels projected; the position table's projection once per batch.
    patch_projection = 2 * m * channels * stem + 2 * m * stem * stem / (
        batch_size)
  elif model.preprocessor == 'conv':
    # The 7x7 convolution at stride 2 (its output is ceil(size / 2) wide);
    # BatchNorm, ReLU and the max-pool are elementwise.
    conv_cells = (-(-model.image_size // 2))**2
    patch_projection = 2 * conv_cells * 7 * 7 * channels * stem
  elif model.position_encoding == 'learned':
    patch_projection = 2 * m * patch_values * d
  elif model.cross_attention_width == 'input':
    patch_projection = 0  # The data array is the unprojected inputs.
  elif model.fourier_mode == 'concat':
    patch_projection = 2 * m * (patch_values + fourier) * d
  else:  # 'add': the position features are projected once per batch.
    patch_projection = 2 * m * (patch_values + fourier / batch_size) * d

  # The model's attention shapes (and forms), as its modules decide them.
  shapes = model.attention_shapes(channels)
  cross_shape, latent_shape = shapes['cross'], shapes['latent']
  cross_sets, latent_sets = (
      sharing.num_weight_sets(model.weight_sharing, kind, t_max)
      for kind in (sharing.CROSS_ATTENTION, sharing.TRANSFORMER))

  t_cross = model.num_cross_attends

  def spread(flops, sets, per_example=False, calls=t_max):
    # XLA computes what `calls` sharing weights share once per weight
    # set (the folded form's weight products once per step, too), but its
    # gradient once per call; counted so that 3x the forward is the
    # step's total, per call (and spread over the examples).
    return flops * (sets + 2 * calls) / (
        3 * calls * (1 if per_example else batch_size))

  def parts_in(cross_folded, latent_folded, decoder_folded):
    cross = attention_flops(cross_folded, *cross_shape)
    latent = attention_flops(latent_folded, *latent_shape)
    decoder = 0
    if 'decoder' in shapes:  # Its weight products once per step.
      decoder = attention_flops(decoder_folded, *shapes['decoder'])
      weights = decoder.pop('weights')
      decoder = sum(decoder.values()) + weights / batch_size
    if model.decoder == 'perceiver_io':  # The block's MLP on the query.
      decoder += _dense_chain_flops(1, ffn)
    return {
        'patch_projection': patch_projection,
        'data_key_value': t_cross * spread(
            cross['key_value'], min(cross_sets, t_cross), per_example=True,
            calls=t_cross),
        # Per iteration: q from the latents, logits and the weighted sum of
        # values, the output projection, the FFN on the latents.
        'cross_attention': (cross['query'] + cross['attention'] +
                            cross['output'] + _dense_chain_flops(n, ffn)),
        'cross_weight_folding': spread(
            cross['weights'], min(cross_sets, t_cross), calls=t_cross),
        # Per block and iteration.
        'transformer_block': (latent['query'] + latent['key_value'] +
                              latent['attention'] + latent['output'] +
                              _dense_chain_flops(n, ffn)),
        'weight_folding': spread(latent['weights'], latent_sets),
        'decoder': decoder,
        'classifier': _dense_chain_flops(
            1, (d,) + tuple(model.classifier_units) + (num_classes,)),
    }

  def total(p):
    return (p['patch_projection'] + p['data_key_value'] + t_cross * (
        p['cross_attention'] + p['cross_weight_folding']) +
            t_max * model.num_transformer_blocks * (
                p['transformer_block'] + p['weight_folding']) +
            p['decoder'] + p['classifier'])

  parts = parts_in(*(
      kind in shapes and model.attention_folded(kind, batch_size, channels)
      for kind in ('cross', 'latent', 'decoder')))
  factored = parts_in(False, False, False)
  parts['total'] = total(parts)
  parts['factored_total'] = total(factored)
  parts['as_written_total'] = total(dict(factored, data_key_value=t_cross * (
      attention_flops(False, *cross_shape)['key_value'])))
  return parts


def analytic_train_flops_per_step(config, num_classes, batch_size=None):
  """Forward + backward matmul FLOPs of one train step (3x the forward).

  The backward pass does two matmuls (input and weight gradients) per
  forward matmul. Rematerialisation's extra forward is deliberately not
  counted: MFU counts the model's FLOPs, not the ones a schedule adds.
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  return 3 * batch_size * analytic_flops_per_example(
      config, num_classes, batch_size=batch_size)['total']


def xla_cost(compiled, num_devices=1):
  """`{'flops', 'bytes'}` XLA's cost analysis counts, all devices together.

  An SPMD-partitioned executable is one device's program, so its counts are
  multiplied by the number of devices it runs on.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one per program.
    analysis = analysis[0]
  return {'flops': float(analysis['flops']) * num_devices,
          'bytes': float(analysis['bytes accessed']) * num_devices}
