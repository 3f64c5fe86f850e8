"""Training: the loop (`loop.train_and_evaluate`), the experiment it sets up,
the jitted steps, the optimiser recipe and schedules, Keras' callbacks,
checkpoints, resume, preemption, metrics, sharding and host memory.

Training imports `model` and `data`, never `tools`. Importing this package
imports nothing (main.py reads `host_memory` before jax starts).
"""
