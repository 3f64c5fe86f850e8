"""ImageNet-1k's 1000 class names as people read them, in label order.

A `.pystate` checkpoint holds weights only, so its import takes the class
names from `imagenet_classes.json`: pytorch/hub's `imagenet_classes.txt`
(github.com/pytorch/hub, commit a6fc887f of 2020-12-22), one name per label
0-999 in ILSVRC2012's order of sorted WordNet ids, tfds imagenet2012's label
order (label 0 is n01440764, "tench"). Each name is the first synonym of
the same label in the list DeepMind's Perceiver IO ImageNet colab prints
(`imagenet_labels.py`: "tench, Tinca tinca"). Two names repeat there as
here: "crane" (134 the bird, 517 the machine) and "maillot" (638, 639).
"""

import functools
import importlib.resources
import json

FILE = 'imagenet_classes.json'


@functools.cache
def names():
  """The 1000 names; `names()[label]` is the class of that label."""
  text = importlib.resources.files(__package__).joinpath(FILE).read_text()
  return tuple(json.loads(text))
