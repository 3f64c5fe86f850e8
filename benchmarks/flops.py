"""Model FLOPs of the Perceiver: counted by hand, and as XLA counts them.

`analytic_flops_per_example` counts every matmul of the forward pass (2 FLOPs
per multiply-add), the usual MFU convention; `xla_flops` reads XLA's cost
analysis of a compiled program, which also counts elementwise work. Imports
neither tensorflow nor tfds.
"""

from perceiver_jax.model import perceiver

CHANNELS = 3  # RGB, unless told otherwise.


def _dense_chain_flops(rows, widths):
  """Matmul FLOPs of Dense layers widths[0] -> widths[1] -> ... on `rows`."""
  return sum(2 * rows * a * b for a, b in zip(widths[:-1], widths[1:]))


def analytic_flops_per_example(config, num_classes, channels=CHANNELS,
                               batch_size=None):
  """Matmul FLOPs of one example's forward pass, by part (2 per multiply-add).

  Counts what dominates and what MFU conventionally counts: the patch
  projection, q/k/v projections, attention logits and weighted sums, output
  projections, FFNs and the classifier. Everything elementwise (LayerNorm,
  GELU, softmax, dropout, residuals, the augmentation) is left out.

  The cross-attention's keys and values are projections of the same data
  array by the same (shared) weights in every iteration, so they are counted
  once: XLA computes them once too (common subexpression elimination), even
  though the seed's code asks for them per iteration.

  The latent self-attention is counted in the form it runs in
  (`config.attention_form`, 'auto' deciding at `batch_size`): the matmuls
  the device executes, so MFU is not flattered by the folded form. The
  folded form's per-head weight products (`W_q W_k^T`, `W_v W_o`) are paid
  once per step and appear spread over the batch ('weight_folding'). The
  factored (Keras-order) count is returned as 'factored_total' either way.

  Args:
    config: a model config (see configs/cifar100.py).
    num_classes: logits width.
    channels: image channels.
    batch_size: the batch the step runs (default config.batch_size).

  Returns:
    dict of FLOPs per part, with the sum under 'total'.
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  d = config.projection_dim
  n = config.latent_dim
  m = (config.image_size // config.patch_size)**2
  heads = config.num_heads
  head_dim = d  # Keras MultiHeadAttention(key_dim=projection_dim).
  ffn = (d,) + tuple(config.ffn_units)
  factored_block = (3 * 2 * n * d * heads * head_dim +   # q, k, v
                    2 * (2 * heads * n * n * head_dim) +  # logits, sums
                    2 * n * heads * head_dim * d +        # output projection
                    _dense_chain_flops(n, ffn))
  folded_block = (2 * n * d * heads * d +    # x W_qk
                  2 * (2 * heads * n * n * d) +  # logits, P x
                  2 * n * heads * d * d +    # (P x) W_vo
                  _dense_chain_flops(n, ffn))
  model = perceiver.create_model(config, num_classes)
  folded = model.latent_attention_folded(batch_size)
  weight_sets = model.num_weight_sets
  parts = {
      'patch_projection': 2 * m * config.patch_size**2 * channels * d,
      'data_key_value': 2 * (2 * m * d * d),
      # Per iteration: q from the latents, logits and the weighted sum of
      # values, the FFN on the latents.
      'cross_attention': (2 * n * d * d + 2 * (2 * n * m * d) +
                          _dense_chain_flops(n, ffn)),
      # Per block and iteration, in the form that runs.
      'transformer_block': folded_block if folded else factored_block,
      # Per block and iteration: W_q W_k^T and W_v W_o of every head. XLA
      # forms them once per step and weight set (iterations sharing weights
      # share them), but their gradient once per iteration; counted so that
      # 3x the forward is the step's total, spread over the examples.
      'weight_folding': (2 * 2 * heads * d * head_dim * d *
                         (weight_sets + 2 * config.num_iterations) /
                         (3 * batch_size * config.num_iterations)
                         if folded else 0),
      'classifier': _dense_chain_flops(
          1, (d,) + tuple(config.classifier_units) + (num_classes,)),
  }

  def total(block):
    return (parts['patch_projection'] + parts['data_key_value'] +
            config.num_iterations *
            (parts['cross_attention'] +
             config.num_transformer_blocks * block) +
            parts['classifier'])

  parts['total'] = total(parts['transformer_block'] + parts['weight_folding'])
  parts['factored_total'] = total(factored_block)
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


def xla_flops(compiled, num_devices=1):
  """FLOPs XLA's cost analysis counts for a compiled program, all devices.

  An SPMD-partitioned executable is one device's program, so its count is
  multiplied by the number of devices it runs on.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0]
  return float(cost['flops']) * num_devices
