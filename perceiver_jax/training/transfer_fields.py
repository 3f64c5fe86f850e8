"""The config fields of transfer (`transfer.py`): which run to start from.

Declared apart from `transfer.py`, which asks `config_lib` for config
differences and defaults, so that `config_lib` checks these fields without
importing transfer: the dependency goes one way.
"""

from perceiver_jax import checks

NORMALIZATIONS = ('source', 'recompute')
RULES = {
    'init_from': checks.Rule(
        lambda v: v is None or (isinstance(v, str) and bool(v)),
        "a trained run's workdir, or unset", '/path/to/imagenet_run'),
    'init_normalization': checks.one_of(*NORMALIZATIONS),
}
OPTION_DEFAULTS = {'init_from': None, 'init_normalization': 'source'}
