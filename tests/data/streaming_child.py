"""Streams tiny JPEGs with two grain workers, prints their ids, awaits a kill.

  python tests/data/streaming_child.py DATA_DIR

tests/data/test_streaming.py SIGKILLs it and checks that the workers end
too. Its work is under `if __name__ == '__main__':`, as a script that
streams must keep it (workers are spawned and import the script).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def main(data_dir):
  # pylint: disable=g-import-not-at-top
  import psutil
  from configs import fake_data
  from perceiver_jax.data import input_pipeline
  from tests.data import tfds_fixtures  # pylint: disable=unused-import
  # pylint: enable=g-import-not-at-top
  config = fake_data.get_config()
  config.update(dict(mock_data=False, dataset='tiny_jpegs',
                     tfds_data_dir=data_dir, batch_size=8, num_epochs=2,
                     host_crop='inception', image_size=16, data_workers=2))
  pipeline = input_pipeline.Pipeline(config, num_shards=1, shard_indices=[0])
  batches = pipeline.train_batches(0, 0)
  next(batches)
  next(batches)  # Each worker has served a batch: both have started.
  workers = [p.pid for p in psutil.Process().children()
             if 'spawn_main' in ' '.join(p.cmdline())]
  print('workers', *workers, flush=True)
  time.sleep(600)


if __name__ == '__main__':
  main(sys.argv[1])
