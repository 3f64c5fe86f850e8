"""A run resumed mid-epoch on a slice of another shape reads on exactly.

Real `main.py` processes on mock data, killed through the
PERCEIVER_JAX_FAULT hook (see test_resilience.py); its own module so that
the test workers can run it beside the other resilience tests.
"""

import json
import signal

from tests.training.test_resilience import _final
from tests.training.test_resilience import _run


def _consumed(record):
  """`[(step, example digests)]` a run's PERCEIVER_JAX_RECORD file lists."""
  with open(record, encoding='utf-8') as f:
    return [(r['step'], r['examples']) for r in map(json.loads, f)]


def test_run_resumed_on_another_slice_reads_on_exactly(tmp_path):
  """1.5 epochs on 2 devices, then resumed on 4: step for step the examples
  of an uninterrupted 4-device run. A new global batch size is taken at an
  epoch end (its refusal mid-epoch: test_resume.py)."""
  # 64 mock training examples, batch 8: 8 steps per epoch; killed after
  # step 12.
  flags = ('--config.num_epochs=2', '--config.batch_size=8')
  reference = _run(tmp_path / 'reference', extra=flags, devices=4,
                   record=tmp_path / 'reference.jsonl')
  assert reference.returncode == 0, reference.stderr[-4000:]
  want = _consumed(tmp_path / 'reference.jsonl')
  assert [step for step, _ in want] == list(range(1, 17))
  first_epoch = sum((examples for _, examples in want[:8]), [])
  assert len(set(first_epoch)) == 64  # Distinct: the comparison can fail.

  workdir, record = tmp_path / 'run', tmp_path / 'run.jsonl'
  killed = _run(workdir, fault='kill_after_step@12', extra=flags, devices=2,
                record=record)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
  resumed = _run(workdir, extra=flags, devices=4, record=record)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert 'Resuming from step 12 ' in resumed.stderr
  assert ('Resuming on 4 devices (the checkpoint was written on 2)'
          in resumed.stderr)
  assert _consumed(record) == want

  # At an epoch end the batch size may change: epoch 3 takes 64 // 16 steps.
  grown = _run(workdir, extra=('--config.num_epochs=3',
                               '--config.batch_size=16'), devices=4)
  assert grown.returncode == 0, grown.stderr[-4000:]
  assert ('batch_size 8 -> 16 at the end of epoch 2: epochs from 3 on take 4 '
          'steps (were 8)') in grown.stderr
  step, history, _ = _final(workdir)
  assert step == 16 + 4
  assert [h['epoch'] for h in json.loads(history)] == [1, 2, 3]
