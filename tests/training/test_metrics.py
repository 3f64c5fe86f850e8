"""metrics.py: the learning-curves figure."""

import matplotlib

from perceiver_jax.training import metrics

matplotlib.use('Agg')


def _history(num_epochs, rates):
  return [{'epoch': e, 'learning_rate': rates[e - 1],
           **{f'{split}_{key}': 1.0 / e
              for split in ('train', 'val')
              for key in ('loss', 'accuracy', 'top5_accuracy')}}
          for e in range(1, num_epochs + 1)]


def test_learning_curves_have_whole_epochs_and_the_learning_rate():
  rates = [1e-3, 1e-3, 2e-4, 2e-4, 4e-5]  # Two plateau cuts by 0.2.
  fig = metrics.learning_curves_figure(_history(5, rates))
  axes = fig.axes
  assert [ax.get_title() for ax in axes] == [
      'Loss', 'Top-1 accuracy', 'Top-5 accuracy', 'Learning rate']
  for ax in axes:
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 5]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
  rate = axes[3]
  assert rate.get_yscale() == 'log'
  (line,) = rate.get_lines()
  assert list(line.get_xdata()) == [1, 2, 3, 4, 5]
  assert list(line.get_ydata()) == rates


def test_one_epoch_has_one_whole_tick():
  fig = metrics.learning_curves_figure(_history(1, [1e-3]))
  for ax in fig.axes:
    ticks = [t for t in ax.get_xticks() if float(t).is_integer()]
    assert ticks == list(ax.get_xticks()), ax.get_xticks()
