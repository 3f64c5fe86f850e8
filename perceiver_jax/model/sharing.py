"""Which iterations share weights: the Perceiver's weight-sharing plan.

The Perceiver applies a cross-attention and a latent Transformer in each of
`num_iterations` iterations. Sharing their weights between iterations makes
the model an RNN unrolled in depth with the parameter count of a shallow one
(Jaegle et al. 2021, Sec. 2). Each mode says what it shares:

* 'all' (the seed): one cross-attention and one Transformer serve every
  iteration.
* 'first_cross_attend' (the paper's ImageNet model): iteration 1 has its own
  cross-attention, iterations 2..T share a second one; one Transformer
  serves every iteration. Its 44.9M parameters, against 326.2M unshared,
  are the paper's counts (see configs/imagenet_perceiver.py).
* 'first_iteration': iteration 1 has its own cross-attention AND its own
  Transformer; iterations 2..T share a second set of both (about twice the
  paper's count; earlier versions called this 'paper').
* 'none': every iteration has its own.

A module kind that one set serves in every iteration by design keeps the
seed's parameter name ('cross_attention', 'latent_transformer'); otherwise
set i is named '<kind>_<i>'.
"""

from perceiver_jax import checks
from perceiver_jax.model import attention as attention_lib

WEIGHT_SHARING = ('all', 'first_cross_attend', 'first_iteration', 'none')
# The requirement names the earlier 'paper', so an old config's error says
# what to write instead.
RULE = checks.Rule(
    lambda v: v in WEIGHT_SHARING,
    checks.one_of(*WEIGHT_SHARING).requirement +
    " (earlier versions' 'paper' is now 'first_iteration'; the paper's "
    "ImageNet model shares as 'first_cross_attend')", 'first_iteration')

CROSS_ATTENTION = 'cross_attention'
TRANSFORMER = 'latent_transformer'


def _shared_by_all(mode, kind):
  return mode == 'all' or (mode == 'first_cross_attend' and
                           kind == TRANSFORMER)


def weight_set(mode, kind, iteration):
  """Index of the weight set `kind` uses in 0-based `iteration`."""
  if _shared_by_all(mode, kind):
    return 0
  return iteration if mode == 'none' else min(iteration, 1)


def num_weight_sets(mode, kind, num_iterations):
  """How many weight sets of `kind` (CROSS_ATTENTION or TRANSFORMER)."""
  return weight_set(mode, kind, num_iterations - 1) + 1


def module_name(mode, kind, index):
  """Parameter name of set `index` of `kind`."""
  return kind if _shared_by_all(mode, kind) else f'{kind}_{index}'


def cross_attention_weights(intermediates):
  """The sown encoder attention weights, one per iteration, in order.

  Args:
    intermediates: the 'intermediates' collection returned by
      `model.apply(..., mutable=['intermediates'])`.

  Returns:
    A list of `num_iterations` float32 arrays `[batch, heads, latents,
    inputs]` (heads is 1 for the seed's cross-attention).
  """
  def index(name):  # `module_name`'s: CROSS_ATTENTION, or '<kind>_<i>'.
    return int(name.rpartition('_')[2]) if name[-1].isdigit() else 0

  names = sorted((n for n in intermediates if n.startswith(CROSS_ATTENTION)),
                 key=index)
  return [w for n in names
          for w in intermediates[n]['attention'][
              attention_lib.ATTENTION_WEIGHTS]]
