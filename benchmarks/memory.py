r"""The train step's memory by `grad_accum_steps`, from XLA's memory analysis.

  python benchmarks/memory.py                 # the table in BENCHMARKS.md
  python benchmarks/memory.py --cases=imagenet_perceiver_io:conv@256 \
      --accum=1,16
  python benchmarks/memory.py --smoke         # a tiny model, in seconds

For each case (`CONFIG[:ARG][@BATCH][+DTYPE]`, see benchmarks/cases.py) and
each number of micro-batches K, compiles the train step `main.py` trains
with for one device (`train_program.build`) and reads
`compiled.memory_analysis()`. The step is lowered from abstract inputs (the
state's shapes from `jax.eval_shape`, the batch as `jax.ShapeDtypeStruct`s
of the config's data shape), so nothing of the state's or the batch's size
is allocated: a batch far too large for this machine compiles all the same.

XLA reports the bytes of the arguments (state, batch, learning rate), the
outputs (new state, metric sums) and the temporaries of the program. The
state is donated, so it is both an argument and an output (XLA's 'alias'
bytes); the step's peak is `argument + output + temp - alias`
(`compiled_memory_bytes`, which the other benchmarks report too). On a
CPU these are XLA:CPU's buffer assignment; XLA:GPU and XLA:TPU fuse and
schedule differently, so their figures differ (an accelerator's own
compile gives its own). Imports neither tensorflow nor tfds.
"""

import json
import os
import sys
import time

# Run as a script from anywhere: make the repository root importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import cases as cases_lib
from benchmarks import roofline
# pylint: enable=g-import-not-at-top,wrong-import-position

# The cases and K of BENCHMARKS.md's table: the ImageNet configs at their
# own batch (the papers' 1024).
DEFAULT_CASES = ('imagenet_perceiver', 'imagenet_perceiver_io:learned',
                 'imagenet_perceiver_io:fourier', 'imagenet_perceiver_io:conv')
DEFAULT_ACCUM = (1, 4, 16, 64)
SMOKE_CASES = ('fake_data@16',)
SMOKE_ACCUM = (1, 4)


def compiled_memory_bytes(compiled):
  """XLA's static estimate of one device's memory for a compiled program.

  `argument + output + temp - alias`, or None where the backend does not
  analyse memory.
  """
  try:
    parts = memory_parts(compiled)
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  return parts and parts['peak']


def memory_parts(compiled):
  """`{argument, output, alias, temp, peak}` bytes of a compiled program."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  parts = {'argument': m.argument_size_in_bytes,
           'output': m.output_size_in_bytes,
           'alias': m.alias_size_in_bytes,
           'temp': m.temp_size_in_bytes}
  parts['peak'] = (parts['argument'] + parts['output'] + parts['temp'] -
                   parts['alias'])
  return parts


def step_memory(config, *, compiler_options=None):
  """Compiles `config`'s train step for one device from abstract inputs.

  Returns:
    `memory_parts` of the compiled step, and `compile_s`.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from benchmarks import train_program
  from perceiver_jax.training import sharding as sharding_lib
  # pylint: enable=g-import-not-at-top
  start = time.perf_counter()
  step = train_program.build(
      config, sharding_lib.create_mesh(jax.devices()[:1]), abstract=True)
  compiled, _ = train_program.compile_step(step, compiler_options)
  return dict(memory_parts(compiled), compile_s=time.perf_counter() - start)


def table(results):
  """Markdown: one row per case and K, sizes in MiB."""
  mib = lambda b: f'{b / 2**20:,.1f}'
  lines = ['| case | batch | dtype | K | micro-batch | arguments MiB | '
           'outputs MiB | aliased MiB | temporaries MiB | peak MiB | '
           'compile |',
           '| --- ' * 11 + '|']
  for r in results:
    lines.append(
        f"| {r['case']} | {r['batch']} | {r['dtype']} | {r['accum']} | "
        f"{r['batch'] // r['accum']} | {mib(r['argument'])} | "
        f"{mib(r['output'])} | {mib(r['alias'])} | {mib(r['temp'])} | "
        f"**{mib(r['peak'])}** | {r['compile_s']:.0f} s |")
  return '\n'.join(lines)


def main(argv):
  """Usage in the module docstring."""
  # pylint: disable=g-import-not-at-top
  import argparse
  import jax
  # pylint: enable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default=','.join(DEFAULT_CASES),
                      help=f'Comma-separated {cases_lib.SPELLING}.')
  parser.add_argument('--accum', default=','.join(map(str, DEFAULT_ACCUM)),
                      help='Comma-separated grad_accum_steps to compile.')
  parser.add_argument('--smoke', action='store_true',
                      help=f'Only {",".join(SMOKE_CASES)} at K='
                      f'{",".join(map(str, SMOKE_ACCUM))}.')
  parser.add_argument('--json', default='', help='Also write results here.')
  args = parser.parse_args(argv)
  specs = SMOKE_CASES if args.smoke else args.cases.split(',')
  accums = SMOKE_ACCUM if args.smoke else [int(k) for k in
                                           args.accum.split(',')]
  device = jax.devices()[0]
  print(f'memory analysis on: 1 x {device.device_kind} ({device.platform}), '
        f'jax {jax.__version__}', flush=True)
  results = []
  for case in map(cases_lib.parse_case, specs):
    for accum in accums:
      config = case.config()
      if config.batch_size % accum:
        print(f'{case.spec} K={accum}: skipped, batch {config.batch_size} '
              'does not split into that many micro-batches.')
        continue
      config.grad_accum_steps = accum
      r = step_memory(
          config, compiler_options=roofline.compiler_options(device.platform))
      r.update(case=case.spec, batch=config.batch_size, accum=accum,
               dtype=config.get('dtype', 'float32'))
      results.append(r)
      print(f"{case.spec} K={accum}: peak {r['peak'] / 2**20:,.1f} MiB (temp "
            f"{r['temp'] / 2**20:,.1f}); compiled in {r['compile_s']:.0f} s",
            flush=True)
  print(table(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  cases_lib.input_errors_as_paragraphs(main)(sys.argv[1:])
