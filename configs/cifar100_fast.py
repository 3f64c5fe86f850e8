"""The seed's model, set up for throughput on GPUs and TPUs.

Same model and recipe as configs/cifar100.py except:
  - global batch 512 (8x the seed's 64), learning rate scaled by
    sqrt(512 / 64) to 2.83e-3, LAMB's square-root rule (You et al. 2019);
  - bfloat16 compute (`dtype`); parameters, gradients and the optimiser
    state stay float32, and the logits are float32;
  - `attention_impl=None`: jax picks the fused cuDNN attention where it
    applies, XLA elsewhere. Fused attention cannot drop attention weights,
    so it runs in evaluation; training keeps the seed's attention dropout
    (0.1) and materialises the weights.
Like every config it runs the latent self-attention folded and draws hash
dropout bits (`attention_form='auto'`, `dropout_bits='hash'`: the same
function with fewer FLOPs). Augmentation runs on the device inside the
jitted train step (as it does for every config) and the train state is
donated to the step.

Command:
  python main.py --config=configs/cifar100_fast.py  # runs/cifar100_fast
Throughput alone:
  python benchmarks/throughput.py --config=configs/cifar100_fast.py --steps=50

Expected result: not yet measured. The epoch time on a GPU has not been
measured yet (BENCHMARKS.md lists the commands), and neither has the
accuracy: a batch 8x larger takes 8x fewer steps per epoch, so the seed's
52.6% top-1 is the target, not a measured outcome.
"""

import math

from ml_collections import config_dict

from configs import cifar100

SEED_BATCH_SIZE = 64


def get_config():
  """Returns the throughput-oriented configuration."""
  config = cifar100.get_config()
  config.batch_size = 512
  config.learning_rate = 0.001 * math.sqrt(config.batch_size / SEED_BATCH_SIZE)
  # Fields the model reads with config.get (see model/perceiver.py).
  config.dtype = 'bfloat16'
  # None (unset): jax's choice. A str placeholder, so that
  # --config.attention_impl=cudnn (or xla) still parses.
  config.attention_impl = config_dict.placeholder(str)
  config.remat = False
  return config
