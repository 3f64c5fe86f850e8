"""Perceiver (Jaegle et al. 2021) image classification in JAX/Flax.

`create_model` builds the linen module; `perceiver_jax.train.train_and_evaluate`
runs a whole experiment. Importing this package does not import tensorflow.
"""

from perceiver_jax.model import create_model

__all__ = ['create_model']
