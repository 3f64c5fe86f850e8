"""Weights of other implementations, imported.

Pure numpy: the readers and name tables here need neither the framework
that wrote the weights nor jax.
"""
