"""The fast paths, checked against the float32 train step on the device.

Each path (bfloat16 compute, remat, Keras' factored attention order, and on
GPUs the fused cuDNN attention) computes the seed's function; run from one
initial state on the same batches it must agree with its reference within
`TOLERANCES`, which say why each bound is what it is.
"""

import statistics
import time

import jax
import numpy as np

from benchmarks import cases
from benchmarks import step_bench
from benchmarks import throughput
from perceiver_jax.model import perceiver

# Relative errors a fast path may have against the float32 step. Each path
# computes the same function; they differ in rounding only. The bounds are
# set by the coarsest matmul rounding in either step, bfloat16's (8
# significant bits, unit roundoff 2**-8 = 0.4%): the bfloat16 paths round to
# it, and on TPUs the float32 step's own matmuls do too (jax's default
# precision is one bfloat16 pass there; TF32 on GPUs rounds 8x finer), so
# the order of the products alone (folded vs factored, remat's recompute)
# can move a TPU result that much. Measured on this repo's CPU for the seed
# model (batch 16, 3 steps; BENCHMARKS.md, "Device check"): bfloat16 against
# float32 moved the loss by 0.076%, the gradient norm by 0.38% and the
# update by 14% (cosine 0.990); remat and the factored form, in float32,
# moved loss and gradient norm by 4e-7 or less and the update by 0.02%.
# The bounds leave 4-13x over bfloat16's errors. What they catch, measured
# the same way: other dropout masks (threefry bits instead of hash, a
# stand-in for a mask bug) moved the loss by 4.1%, the gradient norm by 11%
# and the update by 79% (cosine 0.69), failing all four; a 0.12 instead of
# 0.1 attention dropout rate (0.11%, 0.80%, 21%, cosine 0.977) passes:
# differences that small are within bfloat16's own rounding and only a
# float32 comparison could see them.
TOLERANCES = {
    # Mean cross-entropy per step (about 5 nats on random labels at the
    # start of training).
    'loss': 5e-3,
    # Global gradient norm per step; checked to be far from 0 (> 0.1).
    'grad_norm': 5e-2,
    # |update - reference update| / |reference update| over all parameters
    # after the last step. LAMB's first steps move each weight by about
    # lr * sign(gradient) (Adam's m / sqrt(v) before the trust ratio), so a
    # weight whose gradient is below the rounding error can flip direction:
    # the loosest bound.
    'update': 0.5,
}
# The update's direction: cosine similarity with the reference update.
MIN_COSINE = 0.9



def check_paths(seed_config, smoke=False):
  """`(name, reference name, config)` of each fast path and its reference.

  The reference runs the default `attention_form='auto'`, which folds the
  seed's latent attention; where it does not fold, the folded form is a
  path of its own (not with `smoke`: the same code as 'factored').
  """
  platform = jax.devices()[0].platform
  reference = seed_config
  paths = [('float32', None, reference),
           ('bfloat16', 'float32',
            cases.variant(reference, dtype='bfloat16')),
           ('remat', 'float32', cases.variant(reference, remat=True)),
           ('factored', 'float32',
            cases.variant(reference, attention_form='factored'))]
  model = perceiver.create_model(reference, cases.data_shape(reference)[0])
  if not (smoke or model.latent_attention_folded(reference.batch_size)):
    paths.append(('folded', 'float32',
                  cases.variant(reference, attention_form='folded')))
  skipped = []
  if platform == 'gpu':
    no_drop = cases.variant(reference, attention_dropout_rate=0.0)
    paths += [('float32, no attention dropout', None, no_drop),
              ('cudnn (bfloat16)', 'float32, no attention dropout',
               cases.variant(no_drop, dtype='bfloat16',
                                  attention_impl='cudnn'))]
  else:
    skipped.append(('cudnn (bfloat16)', f'fused cuDNN attention is GPU-only '
                    f'(platform: {platform})'))
  return paths, skipped


def run_check(bench, program, num_steps):
  """Losses and gradient norms of `num_steps` steps, and the update."""
  state = bench.initial_state(program)
  initial = step_bench.flat(jax.device_get(state.params))
  lr = float(program.config.learning_rate)
  losses, grad_norms = [], []
  for i in range(num_steps):
    state, metrics = program.compiled(state, bench.batch(program, seed=i), lr)
    metrics = jax.device_get(metrics)
    losses.append(float(metrics['loss']) / float(metrics['count']))
    grad_norms.append(float(metrics['grad_norm']))
  update = step_bench.flat(jax.device_get(state.params)) - initial
  return state, {'losses': losses, 'grad_norms': grad_norms}, update


def compare(result, reference, update, reference_update):
  """Relative errors of a path against its reference, and the verdict."""
  def worst(key):
    return max(abs(a - b) / abs(b) for a, b in zip(result[key],
                                                   reference[key]))
  norm = np.linalg.norm(reference_update)
  errors = {'loss': worst('losses'), 'grad_norm': worst('grad_norms'),
            'update': float(np.linalg.norm(update - reference_update) / norm)}
  cosine = float(update @ reference_update /
                 (np.linalg.norm(update) * norm))
  problems = [f'{k} {v:.2g} > {TOLERANCES[k]:g}' for k, v in errors.items()
              if not v <= TOLERANCES[k]]
  if not cosine >= MIN_COSINE:
    problems.append(f'cosine {cosine:.3f} < {MIN_COSINE}')
  if not min(reference['grad_norms']) > 0.1:
    problems.append('reference gradient norm too small to compare')
  return dict(errors, cosine=cosine,
              verdict='ok' if not problems else 'FAIL: ' + '; '.join(problems))


def check_all(bench, paths_and_skipped, name, num_steps, timing_steps,
              deadline, log=print):
  """Runs every path of `check_paths` and compares it with its reference.

  Args:
    bench: the `step_bench.Bench` that compiles and feeds the steps.
    paths_and_skipped: what `check_paths` returns.
    name: the seed config's name, for the compile log.
    num_steps: train steps each path takes from the common initial state.
    timing_steps: steps timed per path (its step ms, for the table).
    deadline: `time.perf_counter()` after which no path starts.
    log: progress lines.

  Returns:
    `(rows, status)`: one row per path (its verdict, errors, losses and
    step time) and the section's status.
  """
  paths, skipped = paths_and_skipped
  programs = bench.programs(
      [(f'{name} [{path}]', config) for path, _, config in paths],
      deadline=deadline)
  rows, outcome, status = [], {}, 'done'
  for (path, against, _), program in zip(paths, programs):
    row = {'path': path, 'against': against}
    if program.error:
      row['verdict'] = program.error
      status = 'done, with errors'
    elif time.perf_counter() > deadline:
      row['verdict'] = 'skipped: the section ran out of time'
      status = 'out of time'
    else:
      try:
        state, result, update = run_check(bench, program, num_steps)
        outcome[path] = (result, update)
        timed = throughput.time_steps(
            program.compiled, state, bench.batch(program),
            float(program.config.learning_rate), timing_steps, 1)
        row['step_ms'] = statistics.median(timed[2]) * 1e3
        del state, timed
        row.update(losses=result['losses'], grad_norms=result['grad_norms'])
        if against is None:
          row['verdict'] = 'reference'
        elif against not in outcome:
          row['verdict'] = f'no reference ({against} did not run)'
        else:
          row.update(compare(result, outcome[against][0], update,
                             outcome[against][1]))
      except Exception as e:  # pylint: disable=broad-except
        row['verdict'] = step_bench.short_error(e)
        status = 'done, with errors'
    rows.append(row)
    log(f"  {path}: {row['verdict']}" + (
        f" (loss {row['loss']:.2e}, grad norm {row['grad_norm']:.2e}, "
        f"update {row['update']:.2e}, cosine {row['cosine']:.4f})"
        if 'loss' in row else ''))
  for path, reason in skipped:
    rows.append({'path': path, 'verdict': 'skipped: ' + reason})
    log(f'  {path}: skipped: {reason}')
  failed = [r['path'] for r in rows if r['verdict'].startswith('FAIL')]
  return rows, status + (f"; FAIL: {', '.join(failed)}" if failed else '')
