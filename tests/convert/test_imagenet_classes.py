"""The ImageNet-1k class names a .pystate import labels its classes with."""

from perceiver_jax.convert import imagenet_classes


def test_the_1000_names_in_label_order():
  names = imagenet_classes.names()
  assert len(names) == 1000 and all(isinstance(n, str) and n for n in names)
  # Spot checks against the source (imagenet_classes.py's docstring) and
  # the first synonyms of DeepMind's colab labels.
  assert names[:3] == ('tench', 'goldfish', 'great white shark')
  assert names[207] == 'golden retriever'
  assert names[281] == 'tabby'
  assert names[251] == 'dalmatian'
  assert names[999] == 'toilet tissue'
  # The two names ImageNet's labels repeat.
  assert names[134] == names[517] == 'crane'
  assert names[638] == names[639] == 'maillot'
  assert len(set(names)) == 998
