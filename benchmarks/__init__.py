"""Throughput benchmarks: the JAX train step and the Keras reference."""
