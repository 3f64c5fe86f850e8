"""Multi-head attention with the per-head weights multiplied first.

Keras' `MultiHeadAttention` projects queries, keys and values per head,
attends, and projects the heads back out. When a head is as wide as the
inputs (the seed's latent Transformer: 8 heads of 256 on 256-wide latents)
the per-head products `W_q W_k^T` and `W_v W_o` are square, and multiplying
them first computes the same function with 4 instead of 6 matmuls of the
same size, none of which needs a head axis transposed. `saves_flops` says
when that pays; `attention.MultiHeadAttention` decides with it
(`attention_form='auto'`).
"""

import jax
import jax.numpy as jnp

from perceiver_jax.model import attention_core
from perceiver_jax.model import compute as compute_lib
from perceiver_jax.model import dropout as dropout_lib


@jax.custom_vjp
def matmul(x, w):
  """`x @ w` for `x [m, k]`, `w [k, n]`; its weight gradient transposes the
  smaller of `x` and the output gradient.

  For `dw = x^T dy` (a contraction over the long `m` axis) XLA:CPU may copy
  whichever operand it likes into a transposed layout. In the folded
  attention one of them is 8x the other (`[b*t, heads*width]` against
  `[b*t, width]`); transposing the small one explicitly, behind an
  optimisation barrier that keeps XLA from undoing it, saves two 8x copies
  per layer. The values are those of `x @ w` and its usual gradient.
  """
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  dx = dy @ w.T
  if x.shape[1] <= dy.shape[1]:
    x_t, = jax.lax.optimization_barrier((x.T,))
    dw = x_t @ dy
  else:
    dy_t, = jax.lax.optimization_barrier((dy.T,))
    dw = (dy_t @ x).T
  return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def folded_attention(inputs_q, inputs_kv, *, query, key, value, output,
                     scale, dropout_rate=0.0, deterministic=True,
                     dropout_key=None, compute=compute_lib.Compute(),
                     dtype=jnp.float32, return_weights=False):
  """Keras multi-head attention, evaluated with the weights folded.

  For head n, Keras computes logits `(x W_q + b_q)(y W_k + b_k)^T * scale`
  and output `sum_n P_n (y W_v + b_v) W_o + b_o`. Expanding the products:

  * logits = `(x W_qk + c) y^T` + terms constant along the keys, which the
    softmax ignores, where `W_qk = W_q W_k^T * scale` (`[d_q, heads, d_kv]`)
    and `c = b_q W_k^T * scale`. The key bias only shifts whole rows of
    logits, so its gradient is zero in either form.
  * output = `sum_n (P_n y) W_vo,n + rowsum(P_n) (b_v W_o)_n + b_o` with
    `W_vo = W_v W_o` (`[heads, d_kv, d_out]`); rowsum is 1 unless the
    weights were dropped.

  Every product is then a plain or batched matmul over the `[batch, length,
  heads, width]` layout, with no transposed copy of a head axis. The weights
  are kept as `[batch, q_length, heads, kv_length]`; dropout draws the same
  mask as the factored form's `[batch, heads, q_length, kv_length]` weights.

  Args:
    inputs_q: `[batch, q_length, d_q]`.
    inputs_kv: `[batch, kv_length, d_kv]`.
    query, key, value: `(kernel [d, heads, head_dim], bias [heads, head_dim])`
      of the projections, key's bias unused (see above).
    output: `(kernel [heads, head_dim, d_out], bias [d_out])`.
    scale: the logits' scale (1/sqrt(head_dim) for Keras).
    dropout_rate, deterministic, dropout_key: attention-weight dropout.
    compute: `Compute` (attention_impl where no dropout is active, and the
      dropout bit generator).
    dtype: compute dtype; the weight products are formed in float32.
    return_weights: also return the float32 softmax weights `[batch, heads,
      q_length, kv_length]` (before dropout).

  Returns:
    `[batch, q_length, d_out]` in `dtype`, and the weights if asked for.
  """
  (w_q, b_q), (w_k, _), (w_v, b_v), (w_o, b_o) = query, key, value, output
  w_qk = jnp.einsum('dnh,enh->dne', w_q, w_k) * scale
  c_q = jnp.einsum('nh,enh->ne', b_q, w_k) * scale
  w_vo = jnp.einsum('enh,nhf->nef', w_v, w_o)
  u = jnp.einsum('nh,nhf->nf', b_v, w_o)
  x, y = inputs_q.astype(dtype), inputs_kv.astype(dtype)
  (batch, q_length, d_q), d_kv = x.shape, y.shape[-1]
  num_heads, d_out = w_vo.shape[0], w_vo.shape[-1]
  a = matmul(x.reshape(batch * q_length, d_q),
             w_qk.reshape(d_q, num_heads * d_kv).astype(dtype))
  a = a.reshape(batch, q_length, num_heads, d_kv) + c_q.astype(dtype)
  dropout = not deterministic and dropout_rate > 0.0
  kv_length = y.shape[1]
  # Queries of every head in one axis: [batch, q_length * heads, d_kv].
  a_flat = a.reshape(batch, q_length * num_heads, d_kv)
  if not dropout and not return_weights:
    shared = y[:, :, None, :]  # one key/value head serves every query head
    z = jax.nn.dot_product_attention(a, shared, shared, scale=1.0,
                                     implementation=compute.attention_impl)
    row_sums = jnp.ones(a.shape[:3], jnp.float32)
  else:
    keep = None
    if dropout:
      keep = dropout_lib.keep_multipliers(
          dropout_key, dropout_rate, (batch, q_length, num_heads, kv_length),
          bits=compute.dropout_bits, perm=(0, 2, 1, 3))
      keep = keep.reshape(a_flat.shape[:2] + (kv_length,))
    z, row_sums = attention_core.softmax_attention(a_flat, y, y, keep)
    z, row_sums = z.reshape(a.shape), row_sums.reshape(a.shape[:3])
  out = matmul(z.reshape(batch * q_length, num_heads * d_kv),
               w_vo.reshape(num_heads * d_kv, d_out).astype(dtype))
  out = (out.reshape(batch, q_length, d_out) +
         jnp.einsum('btn,nf->btf', row_sums.astype(dtype), u.astype(dtype)) +
         b_o.astype(dtype))
  if return_weights:
    weights = attention_core.softmax_weights(a_flat, y).reshape(
        batch, q_length, num_heads, kv_length)
    return out, jnp.transpose(weights, (0, 2, 1, 3))
  return out


def uses_folded_form(form, *shape):
  """Whether an attention of `shape` (see `saves_flops`) runs folded.

  `form` is `compute.Compute.attention_form`: 'folded', 'factored', or
  'auto', which folds where that saves FLOPs.
  """
  return form == 'folded' or (form == 'auto' and saves_flops(*shape))


def saves_flops(batch, q_length, kv_length, d_q, d_kv, d_out, num_heads,
                head_dim):
  """True if `folded_attention` needs fewer multiply-adds than Keras' order.

  Arguments are the call's shapes: batch, query and key/value lengths, the
  query, key/value and output widths, heads and head width.

  Counts every matmul of the forward pass; the weight products are paid
  once per call, not per example.
  """
  per_head = (q_length * d_q * head_dim + 2 * kv_length * d_kv * head_dim +
              2 * q_length * kv_length * head_dim + q_length * head_dim * d_out)
  folded = (q_length * d_q * d_kv + 2 * q_length * kv_length * d_kv +
            q_length * d_kv * d_out)
  weights = d_q * d_kv * head_dim + d_kv * head_dim * d_out
  return batch * folded + weights < batch * per_head
