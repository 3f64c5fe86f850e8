"""Perceiver (Jaegle et al. 2021) image classification in JAX/Flax.

`create_model(config, num_classes)` builds the linen module,
`train_and_evaluate(config, workdir)` runs a whole experiment and
`load(workdir)` returns a trained run's classifier (`tools/api.py`). All are
imported on first use, so `import perceiver_jax` (and `main.py --help`) loads
neither jax nor tensorflow.
"""

import importlib

_LAZY = {
    'create_model': 'perceiver_jax.model.perceiver',
    'load': 'perceiver_jax.tools.api',
    'train_and_evaluate': 'perceiver_jax.training.loop',
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
