"""Rules for option values, each written once, beside the code it protects.

A module lists the rules of its own options (`RULES`: name -> `Rule`) and
checks them in its constructor with `enforce`; `config_lib` checks the same
rules on a config before anything is built, adding the command-line fix. So
an allowed-values list or a bound lives in one place only. Pure Python: the
rules of every folder import without jax or tensorflow.
"""

import dataclasses
import numbers
from typing import Any, Callable


def is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a value must be.

  Attributes:
    ok: the test.
    requirement: completes "... must be": 'a positive integer', 'in [0, 1)'.
    example: a valid value, shown in the fix.
  """
  ok: Callable[[Any], bool]
  requirement: str
  example: Any


def positive_int(example=8):
  return Rule(lambda v: is_int(v) and v > 0, 'a positive integer', example)


def non_negative_int(note='', example=0):
  note = f' ({note})' if note else ''
  return Rule(lambda v: is_int(v) and v >= 0,
              f'a non-negative integer{note}', example)


def number(low, high=float('inf'), *, low_open=False, high_open=False,
           requirement, example):
  """A real number between `low` and `high`, either end open or closed."""
  def ok(v):
    return (is_number(v) and (low < v if low_open else low <= v) and
            (v < high if high_open else v <= high))
  return Rule(ok, requirement, example)


def one_of(*allowed):
  """One of `allowed`, e.g. "'learned' or 'fourier'"."""
  names = [repr(a) for a in allowed]
  text = names[0] if len(names) == 1 else (
      ', '.join(names[:-1]) + ' or ' + names[-1])
  return Rule(lambda v: v in allowed, text, allowed[0])


def tuple_of_positive_ints(example=(256, 256)):
  return Rule(lambda v: isinstance(v, (tuple, list)) and all(
      is_int(u) and u > 0 for u in v), 'a tuple of positive integers',
              example)


RATE = number(0.0, 1.0, high_open=True, requirement='in [0, 1)', example=0.1)
BOOL = Rule(lambda v: isinstance(v, bool), 'True or False', False)


def broken(values, rules):
  """`(name, value, rule)` of each `rules` entry `values` (a dict) breaks."""
  return [(name, values[name], rule) for name, rule in rules.items()
          if name in values and not rule.ok(values[name])]


def enforce(owner, rules, problems=()):
  """Raises ValueError naming every attribute of `owner` that breaks a rule.

  Args:
    owner: an object (a module's dataclass) with the attributes in `rules`.
    rules: name -> Rule.
    problems: further messages from checks across attributes.
  """
  values = {name: getattr(owner, name) for name in rules}
  messages = [f'{name} must be {rule.requirement}, got {value!r}'
              for name, value, rule in broken(values, rules)]
  messages += [p for p in problems if p]
  if messages:
    raise ValueError('; '.join(messages) + '.')
