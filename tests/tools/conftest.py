"""The trained run the tools' tests read: one per test session."""

import pytest

from configs import fake_data
from perceiver_jax.tools import trained as trained_lib
from perceiver_jax.training import loop

MOCK_EXAMPLES = 16  # Every split holds them.


@pytest.fixture(scope='session')
def workdir(tmp_path_factory):
  """A finished one-epoch fake-data run: `(workdir, results)`."""
  config = fake_data.get_config()
  config.num_epochs = 1
  config.mock_num_examples = MOCK_EXAMPLES
  config.ema_decay = 0.5  # The tools must use the EMA weights, as the test did.
  path = tmp_path_factory.mktemp('tools') / 'run'
  _, results = loop.train_and_evaluate(config, str(path))
  return path, results


@pytest.fixture(scope='session')
def trained(workdir):
  return trained_lib.load(workdir[0], mesh=trained_lib.single_device_mesh())
