"""Perceiver IO's classification decoder: a learned query reads the latents.

The seed (and the Perceiver paper) average the final latents; Perceiver IO
(Jaegle et al. 2022) instead lets one learned output query cross-attend to
them, so the model chooses which latents matter for the class.

`QueryDecoder` is that attention alone. `PerceiverIODecoder` is the whole
decoder of Perceiver IO's ImageNet classifiers: a cross-attention block
(LayerNorms on the query and the latents, the query's residual, then a
LayerNorm, an MLP and its residual), as DeepMind's `BasicDecoder` with
`use_query_residual=True` and HuggingFace's `PerceiverClassificationDecoder`
compute it; the model's linear classifier follows either. Without the
query's residual (`query_residual=False`) it is the decoder of DeepMind's
learned-position classifier, whose colab builds it with
`use_query_residual=False` (HuggingFace's port of it adds the residual).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from perceiver_jax import checks
from perceiver_jax.model import attention as attention_lib
from perceiver_jax.model import blocks
from perceiver_jax.model import compute as compute_lib


class QueryDecoder(nn.Module):
  """One learned query (1 x features) cross-attends the LayerNormed latents.

  Standard multi-head cross-attention (1/sqrt(head_dim) scaling, output
  projection), no query residual, as DeepMind's classification decoder.

  Attributes:
    features: width of the latents and of the output.
    num_heads: attention heads; must divide `features`.
    attention_dropout_rate: dropout on the attention weights (train only).
    dtype: compute dtype; parameters are float32.
    compute: `compute.Compute` (attention implementation and form).
    attention_init: 'keras2' or 'keras3' glorot fans of the kernels.
  """
  features: int
  num_heads: int = 1
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  compute: compute_lib.Compute = compute_lib.Compute()
  attention_init: str = 'keras2'
  layer_norm_epsilon: float = attention_lib.LAYER_NORM_EPSILON

  def __post_init__(self):
    checks.enforce(self, {'num_heads': checks.positive_int()}, [
        f'num_heads={self.num_heads} must divide the decoder width '
        f'{self.features}' if self.features % max(self.num_heads, 1) else ''])
    super().__post_init__()

  @nn.compact
  def __call__(self, latents, *, deterministic):
    """Maps latents `[batch, n, features]` to `[batch, features]`."""
    if latents.shape[-1] != self.features:
      raise ValueError(f'Expected latents of width {self.features}, got shape '
                       f'{latents.shape}.')
    # Initialised like the latent array, which is also a learned query.
    query = self.param('query', nn.initializers.normal(stddev=0.05),
                       (1, self.features), jnp.float32)
    query = jnp.broadcast_to(query.astype(self.dtype),
                             (latents.shape[0],) + query.shape)
    latents = attention_lib.LayerNorm(dtype=self.dtype,
                                      epsilon=self.layer_norm_epsilon,
                                      name='latent_norm')(latents)
    out = attention_lib.MultiHeadAttention(
        self.num_heads, self.features // self.num_heads,
        self.attention_dropout_rate, dtype=self.dtype,
        compute=self.compute,
        attention_init=self.attention_init, name='attention')(
            query, latents, deterministic=deterministic)
    return out[:, 0]


class PerceiverIODecoder(nn.Module):
  """A learned query (1 x features) reads the latents in a cross-attention
  block (`blocks.CrossAttentionBlock`, pre-LN, with the query's residual).

  Attributes:
    features: width of the latents, of the query and of the output.
    ffn_units: the block's MLP widths; the last must be `features`.
    num_heads: attention heads (Perceiver IO's classifiers have 1); q, k
      and v are `features` wide.
    dropout_rate, attention_dropout_rate, dtype, compute, attention_init,
      layer_norm_epsilon, gelu_approximate: as the encoder's blocks.
    query_residual: add the query to the attention's output (module doc).
  """
  features: int
  ffn_units: Sequence[int]
  num_heads: int = 1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  compute: compute_lib.Compute = compute_lib.Compute()
  attention_init: str = 'keras2'
  layer_norm_epsilon: float = attention_lib.LAYER_NORM_EPSILON
  gelu_approximate: bool = False
  query_residual: bool = True

  @nn.compact
  def __call__(self, latents, *, deterministic):
    """Maps latents `[batch, n, features]` to `[batch, features]`."""
    if latents.shape[-1] != self.features:
      raise ValueError(f'Expected latents of width {self.features}, got shape '
                       f'{latents.shape}.')
    # DeepMind's and HuggingFace's init of this query (stddev 0.02).
    query = self.param('query', nn.initializers.truncated_normal(0.02),
                       (1, self.features), jnp.float32)
    query = jnp.broadcast_to(query.astype(self.dtype),
                             (latents.shape[0],) + query.shape)
    out = blocks.CrossAttentionBlock(
        self.features, tuple(self.ffn_units), self.dropout_rate,
        self.attention_dropout_rate, dtype=self.dtype, compute=self.compute,
        num_heads=self.num_heads, attention_init=self.attention_init,
        width='input', residual='pre_norm', query_residual=self.query_residual,
        layer_norm_epsilon=self.layer_norm_epsilon,
        gelu_approximate=self.gelu_approximate, name='block')(
            query, latents, deterministic)
    return out[:, 0]
