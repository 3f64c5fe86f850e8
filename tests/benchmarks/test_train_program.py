"""benchmarks/train_program.py: the step every benchmark builds, fed the
config's own data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import cases
from benchmarks import train_program


@pytest.mark.parametrize('spec, classes, served', [
    # CIFAR's 32-pixel images, resized by the step to the model's 16.
    ('fake_data@8', 100, 32),
    # ImageNet's crops are served at the model's size (16 in :test).
    ('imagenet_perceiver_io:test@8', 1000, 16)])
def test_build_feeds_the_configs_data_shape(spec, classes, served):
  config = cases.parse_case(spec).config()
  step = train_program.build(config, abstract=True)
  assert (step.num_classes, step.raw_size) == (classes, served)
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(step.state))
  batch = train_program.synthetic_batch(step)
  shapes = train_program.synthetic_batch(step, abstract=True)
  assert batch['image'].shape == shapes['image'].shape == (8, served, served,
                                                            3)
  assert batch['image'].dtype == shapes['image'].dtype == jnp.uint8
  assert batch['label'].shape == shapes['label'].shape == (8,)
  labels = np.asarray(batch['label'])
  assert labels.min() >= 0 and labels.max() < classes
  assert batch['image'].sharding == shapes['image'].sharding
  logits = jax.eval_shape(
      lambda p: step.model.apply({'params': p}, jnp.zeros(
          (8, config.image_size, config.image_size, 3)), train=False),
      step.state.params)
  assert logits.shape == (8, classes)


def test_build_refuses_a_batch_the_devices_do_not_split():
  """Checked before anything is built, as main.py does (8 CPU devices)."""
  from perceiver_jax import errors  # pylint: disable=g-import-not-at-top
  config = cases.parse_case('fake_data@12').config()
  with pytest.raises(errors.InputError, match='batch_size=12'):
    train_program.build(config, abstract=True)
