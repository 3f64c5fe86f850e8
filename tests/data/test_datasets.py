"""datasets: checking a config's dataset, preparing it, manual downloads."""

import jax
from jax.experimental import multihost_utils
import pytest
import tensorflow_datasets as tfds

from configs import cifar100
from perceiver_jax import errors
from perceiver_jax.data import datasets
from tests.data import tfds_fixtures

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


def test_prepare_orders_processes_around_a_barrier(fake_cifar100,
                                                   monkeypatch):
  events = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'sync_global_devices',
                      lambda name: events.append('barrier'))
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      lambda self, **kwargs: events.append('prepare'))
  config = tfds_fixtures.make_config(fake_cifar100.data_dir)
  for index, want in ((0, ['prepare', 'barrier']), (1, ['barrier', 'prepare'])):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    events.clear()
    datasets.prepare(config)
    assert events == want
  events.clear()
  config.mock_data = True
  datasets.prepare(config)
  assert not events


@pytest.mark.parametrize('dataset,message', [
    ('cifar1000', "'cifar1000' is not a tfds dataset. Did you mean 'cifar100'"),
    ('imdb_reviews', r"must have an `image` feature.*\['label', 'text'\]"),
    ('celeb_a', 'must have an `image` feature.*`label` feature'),
])
def test_dataset_info_rejects_unusable_datasets(tmp_path, dataset, message):
  config = tfds_fixtures.make_config(tmp_path, dataset=dataset)
  with pytest.raises(ValueError, match=message):
    datasets.get_dataset_info(config)


def test_a_data_dir_that_cannot_be_a_folder_is_refused(tmp_path):
  (tmp_path / 'file').write_text('')
  for data_dir in (tmp_path / 'file', tmp_path / 'file' / 'tfds'):
    config = tfds_fixtures.make_config(data_dir)
    with pytest.raises(ValueError, match='tfds_data_dir=.*not a readable'):
      datasets.get_dataset_info(config)
    with pytest.raises(ValueError, match='tfds_data_dir'):
      datasets.prepare(config)


def test_a_data_dir_that_does_not_exist_yet_is_created(tmp_path):
  """As tfds does, and as a first ImageNet preparation expects."""
  data_dir = tmp_path / 'new' / 'tfds'
  config = tfds_fixtures.make_config(data_dir)
  info = datasets.get_dataset_info(config)
  assert data_dir.is_dir()
  assert info.num_classes == 100


def test_varying_image_sizes_take_the_models_input_size(tiny_jpegs):
  config = tfds_fixtures.make_config(tiny_jpegs, dataset='tiny_jpegs',
                                     image_size=48)
  info = datasets.get_dataset_info(config)
  assert (info.height, info.width, info.channels, info.num_classes) == (
      48, 48, 3, 5)
  assert info.variable_size
  assert datasets.file_format(datasets.builder(config)) == 'array_record'


@pytest.mark.parametrize('manual_dir', [None, 'empty'])
def test_a_manual_download_names_the_files_and_the_command(tmp_path,
                                                           monkeypatch,
                                                           manual_dir):
  no_network = tfds_fixtures._no_network  # pylint: disable=protected-access
  monkeypatch.setattr('tensorflow_datasets.core.download.downloader._open_url',
                      no_network)
  config = cifar100.get_config()
  config.dataset, config.tfds_data_dir = 'imagenet2012', str(tmp_path)
  if manual_dir:
    (tmp_path / manual_dir).mkdir()
    config.tfds_manual_dir = str(tmp_path / manual_dir)
  with pytest.raises(errors.InputError) as e:
    datasets.prepare(config)
  message = str(e.value)
  assert 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar' in message
  assert (f'tfds build imagenet2012 --data_dir={tmp_path} --manual_dir='
          f'{config.tfds_manual_dir or "MANUAL_DIR"} '
          '--file_format=array_record') in message
  where = (f"config.tfds_manual_dir={config.tfds_manual_dir!r}" if manual_dir
           else 'config.tfds_manual_dir, unset')
  assert where in message
