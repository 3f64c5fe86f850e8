"""splits: which tfds split each of train / validation / test reads."""

import pytest

from perceiver_jax.data import splits


@pytest.mark.parametrize('dataset, available, want', [
    ('cifar100', ('train', 'test'), 'test'),
    # imagenet2012's 'test' (when its archive was given) has labels -1.
    ('imagenet2012', ('train', 'validation', 'test'), 'validation'),
    ('imagenet2012', ('train', 'validation'), 'validation'),
    ('imagenette', ('train', 'validation'), 'validation'),
])
def test_auto_test_split_is_the_labelled_held_out_one(dataset, available,
                                                      want):
  assert splits.held_out_split('auto', dataset, available) == want
  # A named split is taken as named.
  assert splits.held_out_split('train', dataset, available) == 'train'
