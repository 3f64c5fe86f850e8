"""How the modules compute: kernel choices that keep the model's function.

Every setting here selects among evaluations of the same function (equal up to
floating-point rounding, and for dropout, up to which elements are dropped),
so none of them is a model hyperparameter and a checkpoint trained with one
setting evaluates with another. They travel through the modules as one frozen
(hashable) dataclass.

* `attention_impl`: `jax.nn.dot_product_attention`'s implementation where no
  attention dropout is active (None, 'xla' or 'cudnn').
* `attention_form`: how multi-head attention multiplies its matrices.
  'factored' is Keras' order: project q, k, v per head, attend, project out.
  'folded' multiplies the per-head weights first, `W_q W_k^T` and
  `W_v W_o`, so the heads attend over the un-projected inputs (see
  `folded.folded_attention`); it needs fewer FLOPs when a head is as wide
  as the inputs, as in the seed's latent Transformer (8 heads of 256 on 256
  wide latents: 2/3 of the attention FLOPs, and no transposes). 'auto' picks
  the form with fewer FLOPs for each attention layer.
* `dropout_bits`: 'hash' (a counter-based hash, `dropout.py`) or 'threefry'
  (`jax.random.bernoulli`, as flax's Dropout).
"""

import dataclasses
from typing import Optional

from perceiver_jax import checks
from perceiver_jax import config_lib
from perceiver_jax.model import dropout as dropout_lib

# Values accepted by `jax.nn.dot_product_attention(implementation=...)`.
ATTENTION_IMPLEMENTATIONS = (None, 'xla', 'cudnn')
ATTENTION_FORMS = ('auto', 'factored', 'folded')
RULES = {
    'attention_impl': checks.one_of(*ATTENTION_IMPLEMENTATIONS),
    'attention_form': checks.one_of(*ATTENTION_FORMS),
    'dropout_bits': dropout_lib.BITS_RULE,
}
# Config fields and their defaults (older configs lack the last two).
OPTION_DEFAULTS = dict(attention_impl='xla', attention_form='auto',
                       dropout_bits='hash')


def check_implementation(implementation):
  """Raises ValueError unless `implementation` is one jax.nn accepts."""
  rule = RULES['attention_impl']
  if not rule.ok(implementation):
    raise ValueError(f'attention_impl must be {rule.requirement}, got '
                     f'{implementation!r}.')


@dataclasses.dataclass(frozen=True)
class Compute:
  """Kernel choices; see the module docstring."""
  attention_impl: Optional[str] = 'xla'
  attention_form: str = 'auto'
  dropout_bits: str = 'hash'

  def __post_init__(self):
    checks.enforce(self, RULES)


def from_config(config):
  """The `Compute` a ConfigDict asks for."""
  return Compute(**{name: config_lib.option(config, name)
                    for name in OPTION_DEFAULTS})
