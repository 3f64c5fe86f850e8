"""`--mode=eval`: the weights training tested, on every test example.

The test split is evaluated exactly as training's final test evaluates it
(padded, masked batches over all devices, each example once), from the
workdir's saved config, statistics and checkpoint (`trained.py`), and the
result is printed the way the Keras example prints it.
"""

from perceiver_jax.data import datasets
from perceiver_jax.data import input_pipeline
from perceiver_jax.tools import trained as trained_lib
from perceiver_jax.training import loop
from perceiver_jax.training import metrics as metrics_lib
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps


def run(workdir, *, overrides=None):
  """Evaluates the tested weights on every test example; prints as the seed.

  Returns:
    `{'test_loss', 'test_accuracy', 'test_top5_accuracy', 'num_examples',
    'step', 'checkpoint'}`; `loop.evaluate` checks that the batch masks
    counted each of the `num_examples` once.
  """
  trained_lib.check_workdir(workdir)
  config = trained_lib.load_config(workdir, overrides)
  mesh = sharding_lib.create_mesh()
  sharding_lib.check_batch_size(config.batch_size, mesh)
  data_builder = datasets.builder(config)
  trained = trained_lib.load(workdir, mesh=mesh, config=config,
                             info=datasets.dataset_info(data_builder, config))
  data_builder = datasets.prepare(config, data_builder)
  _, eval_step = steps.jit_steps(config, trained.stats, mesh,
                                 trained.state_shardings)
  # eval_step evaluates `recipe.eval_params(state)`, as training's test did.
  with input_pipeline.Pipeline(
      config, num_shards=mesh.devices.size,
      shard_indices=sharding_lib.local_shard_indices(mesh),
      data_builder=data_builder) as pipeline:
    test = loop.evaluate(eval_step, trained.state, pipeline, 'test', mesh)
  results = {'test_loss': test['loss'], 'test_accuracy': test['accuracy'],
             'test_top5_accuracy': test['top5_accuracy'],
             'num_examples': pipeline.num_test_examples,
             'step': trained.step, 'checkpoint': trained.checkpoint}
  if metrics_lib.is_chief():
    ema = ' (EMA weights)' if trained.uses_ema else ''
    print(f'Evaluating the {trained.checkpoint} checkpoint (step '
          f'{trained.step}, epoch {trained.epoch}){ema} of {workdir} on '
          f'{results["num_examples"]} test examples.')
    print(f'Test loss: {test["loss"]:.4f}')
    print(f'Test accuracy: {round(test["accuracy"] * 100, 2)}%')
    print(f'Test top 5 accuracy: {round(test["top5_accuracy"] * 100, 2)}%')
  return results
