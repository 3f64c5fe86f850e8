"""benchmarks/cases.py: the one case spelling, its configs and data shape."""

import os

import ml_collections
import pytest

from benchmarks import cases
from perceiver_jax import errors
from tests.support import ROOT


def test_spelling():
  case = cases.parse_case('imagenet_perceiver_io:fourier@1024+bfloat16')
  assert case == cases.Case(
      'imagenet_perceiver_io:fourier@1024+bfloat16',
      os.path.join(ROOT, 'configs', 'imagenet_perceiver_io.py'), 'fourier',
      1024, 'bfloat16')
  assert (case.name, case.label) == ('imagenet_perceiver_io',
                                     'imagenet_perceiver_io:fourier')
  # A path (relative to the repository root), each part optional.
  case = cases.parse_case('configs/cifar100.py@64')
  assert (case.path, case.arg, case.batch, case.dtype) == (
      os.path.join(ROOT, 'configs', 'cifar100.py'), None, 64, None)
  case = cases.parse_case('cifar100_fast+float32')
  assert (case.label, case.batch, case.dtype) == ('cifar100_fast', None,
                                                  'float32')
  missing = cases.parse_case('no_such_config@8')
  assert not missing.exists()
  with pytest.raises(errors.InputError, match="'no_such_config@8': no config "
                     'file .*no_such_config.py'):
    missing.config()


def test_config_applies_variant_batch_and_dtype():
  config = cases.parse_case('imagenet_perceiver_io:test@32+bfloat16').config()
  assert (config.batch_size, config.dtype, config.preprocessor) == (
      32, 'bfloat16', 'conv')
  own = cases.parse_case('imagenet_perceiver_io:learned').config()
  assert (own.batch_size, own.dtype, own.position_encoding) == (
      1024, 'float32', 'learned')


@pytest.mark.parametrize('spec, why', [
    ('cifar100:float32:64', 'older CONFIG:DTYPE:BATCH spelling'),
    ('cifar100@0', 'BATCH must be a positive integer'),
    ('cifar100@64+float8', 'DTYPE must be one of'),
    ('cifar100+bfloat16@64', 'DTYPE must be one of'),
    ('@64', 'names no config'),
])
def test_malformed_cases_are_refused_by_name(spec, why):
  with pytest.raises(errors.InputError) as error:
    cases.parse_case(spec)
  message = str(error.value)
  assert repr(spec) in message and why in message, message
  assert cases.SPELLING in message and '\n' not in message


def test_data_shape():
  config = ml_collections.ConfigDict({'dataset': 'imagenet2012',
                                      'image_size': 224})
  assert cases.data_shape(config) == (1000, 224)
  config.dataset = 'cifar100'
  assert cases.data_shape(config) == (100, 32)


def test_a_bad_case_is_one_paragraph_and_status_1():
  def main(argv):
    cases.parse_case(argv[0])

  with pytest.raises(SystemExit) as e:
    cases.input_errors_as_paragraphs(main)(['cifar100@0'])
  assert str(e.value.code).startswith(
      "Error: Benchmark case 'cifar100@0': BATCH must be a positive integer")

  def bug(argv):
    raise KeyError(argv[0])

  with pytest.raises(KeyError):  # A bug keeps its traceback.
    cases.input_errors_as_paragraphs(bug)(['x'])
