"""A `jax.profiler` trace of a window of training steps, written to the workdir.

`config.profile_steps = (first, count)` traces the train steps numbered
`first` .. `first + count - 1` of the run. Steps count from 1, as the
checkpoints do: step N is the update that leaves the train state at step N.
The first step a process runs compiles the train step, so a window that
starts there times compilation too; start at 2 or later (later still to see
the steady state after XLA's autotuning). `()` (the default) or a count of
0 turns profiling off, and the training loop then runs exactly as without
this module.

Each process writes its own trace, into
`WORKDIR/profile/process_<i>/plugins/profile/<date>/` (i: its
`jax.process_index()`): an `.xplane.pb` for TensorBoard's profile plugin
(`tensorboard --logdir WORKDIR/profile` lists one run per process, after
`pip install tensorboard tensorboard-plugin-profile`) and a
`perfetto_trace.json.gz` to open at ui.perfetto.dev. A folder per process
because jax's Perfetto writer takes the newest folder under
`plugins/profile` and expects one trace there: hosts sharing one folder and
stopping in the same second would collide. jax's profiler writes only local
files, so on a gs:// workdir the trace is written to a local folder and
copied in when it stops (`workdir.Mirror`). Every traced step is marked as a
`train` step with its number, so TensorBoard's step-time views and Perfetto
show where each step begins and ends.

The window's edges wait for the device: before its first step the previous
steps finish, and after its last step that step finishes, so the trace holds
exactly the window's device work. Waiting changes no result, only when the
host runs ahead. A window that spans an epoch's end also holds that epoch's
validation and checkpoint. A resumed run traces the part of the window it
still has to run. The trace is stopped when the window ends, and also when
the run ends, is preempted or fails inside it (`with Profile(...)`).

A window that ends after the last step of `num_epochs` is refused before
any data is read or anything compiled (`check_window`, called as soon as
the dataset's metadata gives the steps per epoch): it would never be
written. Early stopping can still end a
run inside the window; the trace then holds the steps that ran.
"""

import itertools
import logging

import jax

from perceiver_jax import checks
from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.training import workdir as workdir_lib

# Under the workdir; TensorBoard's --logdir for the profile plugin.
PROFILE_DIR = 'profile'


def process_dir(workdir, process_index):
  """Where process `process_index` writes its trace."""
  return workdir_lib.path(workdir) / PROFILE_DIR / f'process_{process_index}'


def _is_window(value):
  if not isinstance(value, (tuple, list)):
    return False
  if not value:
    return True
  return (len(value) == 2 and all(checks.is_int(v) for v in value) and
          value[0] >= 1 and value[1] >= 0)


# The option, as the config takes it.
RULES = {
    'profile_steps': checks.Rule(
        _is_window, '() (off) or (first, count): integers, first >= 1 (step '
        '1 compiles) and count >= 0 (0: off)', (10, 5)),
}
# Configs saved before profiling existed lack the field: off.
OPTION_DEFAULTS = {'profile_steps': ()}


def window(config):
  """`(first, last)` steps to trace, both included, or None when off."""
  steps = tuple(config_lib.option(config, 'profile_steps'))
  if not steps or not steps[1]:
    return None
  return steps[0], steps[0] + steps[1] - 1


def check_window(config, steps_per_epoch):
  """Refuses a window that ends after the run's last step.

  Called with the config checks, as soon as the steps per epoch are known
  from the dataset's metadata, before any data is read or anything
  compiled (`experiment.Experiment`).

  Raises:
    errors.InputError: the window ends after the run's last step.
  """
  steps = window(config)
  if steps is None:
    return
  first, last = steps
  total = config.num_epochs * steps_per_epoch
  if last > total:
    count = min(last - first + 1, max(total - 1, 1))
    start = max(1, min(first, total - count + 1))
    raise errors.InputError(
        f'config.profile_steps={tuple(config.profile_steps)!r} traces steps '
        f'{first}..{last}, but training ends at step {total} '
        f'(config.num_epochs={config.num_epochs} x {steps_per_epoch} steps '
        f'per epoch), so the trace would never be written. Pass a window '
        f'inside the run, e.g. --config.profile_steps="({start}, {count})",'
        ' or raise --config.num_epochs.')


class Profile:
  """The loop's profiling hook: `wrap` the train step inside `with profile:`.

  Off (no window), `wrap` returns the train step itself and entering and
  leaving do nothing.
  """

  def __init__(self, config, workdir, steps_per_epoch):
    """Refuses a window past the end of training (`check_window`).

    Args:
      config: the run's config (`profile_steps`, `num_epochs`).
      workdir: the run's workdir; the trace goes to `process_dir`.
      steps_per_epoch: train steps per epoch.

    Raises:
      errors.InputError: the window ends after the run's last step.
    """
    self.window = window(config)
    self.log_dir = process_dir(workdir, jax.process_index())
    self._mirror = None  # The local folder jax writes, while tracing.
    self._active = False
    self._done = False
    self._traced = []  # Numbers of the steps traced so far.
    if self.window is None:
      return
    check_window(config, steps_per_epoch)
    first, last = self.window
    logging.info('Profiling train steps %d..%d into %s.', first, last,
                 self.log_dir)

  def wrap(self, train_step, step):
    """`train_step`, tracing the calls that make the window's steps.

    Args:
      train_step: `(state, batch, learning_rate) -> (state, metrics)`.
      step: the global step the state is at before the first call.

    Returns:
      A function like `train_step`; `train_step` itself when profiling is
      off or the window is already done.
    """
    if self.window is None or self._done:
      return train_step
    first, last = self.window
    numbers = itertools.count(step + 1)

    def traced(state, batch, learning_rate):
      number = next(numbers)
      if first <= number <= last and not self._active:
        jax.block_until_ready(state)  # Leave the steps before outside.
        self._mirror = workdir_lib.Mirror(self.log_dir)
        jax.profiler.start_trace(str(self._mirror.local),
                                 create_perfetto_trace=True)
        self._active = True
      if not self._active:
        return train_step(state, batch, learning_rate)
      self._traced.append(number)
      with jax.profiler.StepTraceAnnotation('train', step_num=number):
        out = train_step(state, batch, learning_rate)
      if number >= last:
        jax.block_until_ready(out)  # The last step's device work, whole.
        self._stop()
      return out

    return traced

  def _stop(self):
    if self._active:
      self._active = False
      self._done = True
      try:
        jax.profiler.stop_trace()
      finally:
        self._mirror.close()  # Copies a gs:// workdir's trace in.
      logging.info('Wrote the profile of train steps %d..%d to %s.',
                   self._traced[0], self._traced[-1], self.log_dir)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    """Stops a trace the run left open (early stop, preemption, error)."""
    self._stop()
    return False
