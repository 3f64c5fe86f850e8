"""Smoke run: the whole pipeline on tfds mock data with a tiny Perceiver.

Needs no network and no prepared dataset; finishes in well under a minute on
one CPU.

Command:
  python main.py --config=configs/fake_data.py  # writes runs/fake_data

Expected result: chance-level accuracy (the mock images are random noise),
printed as the seed's `Test accuracy: X%` and `Test top 5 accuracy: Y%` lines.
"""

from configs import cifar100


def get_config():
  """Returns a tiny configuration on mock CIFAR-100 data."""
  config = cifar100.get_config()
  config.mock_data = True
  config.mock_num_examples = 64
  config.batch_size = 16
  config.num_epochs = 2
  config.image_size = 16
  config.patch_size = 4
  config.latent_dim = 8
  config.projection_dim = 16
  config.num_heads = 2
  config.ffn_units = (16, 16)
  config.num_transformer_blocks = 1
  config.num_iterations = 2
  config.classifier_units = (16,)
  config.log_every_steps = 4
  return config
