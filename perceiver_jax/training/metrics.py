"""Metric sums, history, TensorBoard scalars, learning curves, progress bar.

Steps return per-batch *sums* (loss, correct top-1, correct top-5, count) on
the device; `MetricSums` fetches them lazily every few steps, so the
accelerator is not synchronised every step, and adds them in float64 in step
order, so a resumed run reproduces the same epoch means bit for bit. Only
process 0 writes files (through `workdir.py`) or draws the progress bar.
"""

import io
import math
import os
import time

import jax

from perceiver_jax import checks
from perceiver_jax.training import workdir as workdir_lib

KEYS = ('loss', 'accuracy', 'top5_accuracy', 'count')
# How often running metrics are fetched and shown, as the config takes it.
RULES = {'log_every_steps': checks.positive_int(example=50)}


class NonFiniteError(RuntimeError):
  """The loss or the gradients stopped being finite."""


class MetricSums:
  """Running float64 sums of step metrics, with device values fetched lazily.

  Each fetch also checks that loss and gradient norm stayed finite, so a
  diverging run stops, naming the step, before anything saves it.
  """

  def __init__(self, sums=None):
    self.sums = dict.fromkeys(KEYS, 0.0)
    self.sums.update(sums or {})
    self._pending = []

  def add(self, step_metrics, step=None):
    """Queues the metrics of global step `step` (device arrays)."""
    self._pending.append((step, step_metrics))

  def flush(self):
    steps = [s for s, _ in self._pending]
    values = jax.device_get([m for _, m in self._pending])
    self._pending = []
    for step, m in zip(steps, values):
      bad = [k for k in ('loss', 'grad_norm', 'param_norm')
             if k in m and not math.isfinite(float(m[k]))]
      if bad:
        raise NonFiniteError(
            f'{", ".join(bad)} became {float(m[bad[0]])} at step {step}. '
            'Training stopped; checkpoints up to the last good step are '
            'intact. Lower config.learning_rate, or check the data, then '
            'rerun to resume from the last checkpoint.')
      for k in KEYS:
        self.sums[k] += float(m[k])
    return dict(self.sums)

  def means(self):
    """Loss and accuracies averaged over every example seen."""
    s = self.flush()
    n = max(s['count'], 1.0)
    return {k: s[k] / n for k in KEYS if k != 'count'}


def is_chief():
  return jax.process_index() == 0


def plot_learning_curves(history, path):
  """Writes `learning_curves_figure(history)` to `path` as a PNG."""
  if not is_chief() or not history:
    return
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = learning_curves_figure(history)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  plt.close(fig)
  workdir_lib.write(path, buffer.getvalue())


def learning_curves_figure(history):
  """Loss, top-1 and top-5 accuracy (train and validation) and the learning
  rate against epoch.

  Epochs are whole numbers on every axis; the learning rate is on a log
  scale, where each ReduceLROnPlateau cut is a step of the same height.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  # pylint: enable=g-import-not-at-top
  epochs = [h['epoch'] for h in history]
  fig, axes = plt.subplots(1, 4, figsize=(20, 4))
  for ax, key, title in zip(axes, ('loss', 'accuracy', 'top5_accuracy'),
                            ('Loss', 'Top-1 accuracy', 'Top-5 accuracy')):
    ax.plot(epochs, [h[f'train_{key}'] for h in history], 'o-', label='train')
    ax.plot(epochs, [h[f'val_{key}'] for h in history], 'o-',
            label='validation')
    ax.set_title(title)
    ax.legend()
  rate = axes[3]
  rate.plot(epochs, [h['learning_rate'] for h in history], 'o-',
            drawstyle='steps-pre', color='tab:green')
  rate.set_yscale('log')  # Epoch e's rate held over (e - 1, e].
  rate.set_title('Learning rate')
  for ax in axes:
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)  # Whole ticks for 1 too.
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  return fig


class SummaryWriter:
  """TensorBoard scalars (tensorboardX), written by process 0 only.

  It writes into a local `workdir.Mirror` of `logdir`, copied in at every
  flush, so every workdir file reaches gs:// the same way; tensorboardX's
  own gs:// writer keeps the whole file in memory and uploads it again from
  `__del__`, at interpreter exit too.
  """

  def __init__(self, logdir):
    self._writer = None
    if is_chief():
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._mirror = workdir_lib.Mirror(logdir)
      self._writer = tensorboardX.SummaryWriter(os.fspath(self._mirror.local))

  def scalars(self, step, scalars):
    if self._writer:
      for k, v in scalars.items():
        self._writer.add_scalar(k, v, step)
      self._writer.flush()
      self._mirror.sync()

  def close(self):
    if self._writer:
      self._writer.close()
      self._mirror.close()


class ProgressBar:
  """Per-epoch tqdm bar with step, loss, accuracy and images/s."""

  def __init__(self, epoch, num_epochs, total, initial, batch_size):
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm.tqdm(total=total, initial=initial,
                          desc=f'Epoch {epoch}/{num_epochs}', unit='step',
                          disable=not is_chief(), dynamic_ncols=True,
                          mininterval=1.0)
    self._batch_size = batch_size
    self._last_time = time.perf_counter()
    self._last_n = initial

  def update(self, n, metrics):
    """Moves to step `n` of the epoch and shows running means."""
    now = time.perf_counter()
    rate = (n - self._last_n) * self._batch_size / max(now - self._last_time,
                                                       1e-9)
    self._last_time, self._last_n = now, n
    self._bar.update(n - self._bar.n)
    self._bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                          acc=f"{metrics['accuracy']:.4f}",
                          img_s=f'{rate:.0f}', refresh=False)

  def close(self, postfix=None):
    if postfix:
      self._bar.set_postfix_str(postfix, refresh=False)
    self._bar.close()


class EpochLog:
  """An epoch's bookkeeping: running metric sums, progress bar, TensorBoard.

  Running means are fetched (and checked for finiteness) every
  `log_every` steps, at the epoch's last step and whenever `force` asks,
  e.g. before a checkpoint, so no checkpoint follows a diverged step.
  """

  def __init__(self, writer, epoch, num_epochs, steps_per_epoch, first_step,
               batch_size, log_every, sums=None):
    self.sums = MetricSums(sums)
    self._writer = writer
    self._steps_per_epoch = steps_per_epoch
    self._log_every = log_every
    self._bar = ProgressBar(epoch + 1, num_epochs, steps_per_epoch,
                            first_step, batch_size)

  def add(self, step, steps_done, metrics, learning_rate, force=False):
    """Records global step `step`, the epoch's `steps_done`-th."""
    self.sums.add(metrics, step)
    if (force or steps_done == self._steps_per_epoch
        or steps_done % self._log_every == 0):
      running = self.sums.means()  # Raises if a step went non-finite.
      self._bar.update(steps_done, running)
      self._writer.scalars(step, {'train/running_loss': running['loss'],
                                  'train/learning_rate': learning_rate})

  def close(self, summary=None):
    self._bar.close(summary)
