r"""A roofline on paper: the train step's predicted time on GPUs and TPUs.

  python benchmarks/roofline.py            # the table in BENCHMARKS.md
  python benchmarks/roofline.py --cases=cifar100@64+float32 --top=10

Compiles each case's train step (the one `main.py` trains with,
`train_program.build`, from abstract inputs) on the machine it runs on,
reads XLA's cost analysis of the compiled program (FLOPs and bytes
accessed) and predicts the step time on each accelerator of
`ACCELERATORS` from its published peak FLOP/s and memory bandwidth:

  time = max(flops / peak, bytes / bandwidth)

the larger term naming the bound (compute or memory) and the ratio of the two
saying by how much. This is a lower bound: it assumes every byte streams at
full bandwidth and every FLOP runs at the matmul peak, with compute and
memory traffic fully overlapped.

Where the bytes come from: compiled for the CPU, the program's fusions are
XLA:CPU's, and "bytes accessed" sums each fusion's operands and result, so
it depends on what was fused. XLA:GPU and XLA:TPU fuse more (e.g. matmul
epilogues, softmax, multi-output fusions), so their bytes are usually fewer;
a CPU compile's memory time is therefore an upper estimate of what the same
step needs on an accelerator, and a CPU-compiled "memory-bound" verdict can
turn compute-bound there. The FLOPs do not depend on fusion. `--top=N`
lists the N fusions that access the most bytes (parsed from the compiled
HLO), to show where the traffic is. `benchmarks/device_check.py` makes the
same prediction from the accelerator's own compile and measured peaks.

Cases are `CONFIG[:ARG][@BATCH][+DTYPE]` (benchmarks/cases.py: `CONFIG` a
file under configs/ without `.py`, or a path; the config's own batch and
dtype where left out). Imports neither tensorflow nor tfds.
"""

import dataclasses
import json
import math
import os
import sys
import time

# Run as a script from anywhere: make the repository root importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import cases as cases_lib
from benchmarks import hlo_bytes
# pylint: enable=g-import-not-at-top,wrong-import-position


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """Published peak rates of one chip (dense, no sparsity).

  Attributes:
    name: as in the table.
    bf16_flops: dense bfloat16 matmul FLOP/s.
    f32_flops: FLOP/s of a float32 matmul at jax's default precision
      (`jax.lax.Precision.DEFAULT`: TF32 on Ampere and newer GPUs, one
      bfloat16 pass on TPUs, per its docstring).
    bandwidth: HBM bytes/s.
    memory: HBM bytes.
    source: where the numbers are published.
  """
  name: str
  bf16_flops: float
  f32_flops: float
  bandwidth: float
  memory: float
  source: str


ACCELERATORS = (
    Accelerator('H100 SXM', 989e12, 494.7e12, 3.35e12, 80e9,
                'NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 '
                'and TF32 989 TFLOPS with sparsity, half without; 80 GB at '
                '3.35 TB/s'),
    Accelerator('H200 SXM', 989e12, 494.7e12, 4.8e12, 141e9,
                'NVIDIA H200 Tensor Core GPU datasheet (SXM): the H100 '
                "SXM's Tensor Core rates; 141 GB at 4.8 TB/s"),
    Accelerator('TPU v4', 275e12, 275e12, 1200e9, 32 * 2**30,
                'Cloud TPU docs, "TPU v4": 275 TFLOPS (bf16) per chip, HBM2 '
                '32 GiB at 1200 GBps'),
    Accelerator('TPU v5e', 197e12, 197e12, 819e9, 16e9,
                'Cloud TPU docs, "TPU v5e": 197 TFLOPS (bf16) per chip, HBM2 '
                '16 GB at 819 GBps'),
)


def peak_flops(accelerator, dtype):
  """The matmul peak a step computing in `dtype` can reach."""
  return (accelerator.bf16_flops if dtype in ('bfloat16', 'float16')
          else accelerator.f32_flops)


def predict(flops, num_bytes, peak, bandwidth):
  """The roofline of one step: `max(flops / peak, bytes / bandwidth)`.

  Returns:
    dict with `compute_s`, `memory_s`, `time_s` (the larger), `bound`
    ('compute' or 'memory', the larger term) and `ratio` (larger / smaller:
    how far the step is from the other bound; 1 is balanced).
  """
  compute_s, memory_s = flops / peak, num_bytes / bandwidth
  bound = 'compute' if compute_s >= memory_s else 'memory'
  slow, fast = max(compute_s, memory_s), min(compute_s, memory_s)
  return {'compute_s': compute_s, 'memory_s': memory_s, 'time_s': slow,
          'bound': bound, 'ratio': slow / fast if fast else math.inf}


# --------------------------------------------------------------------------
# Cases and the table.

# The cases of BENCHMARKS.md's table.
DEFAULT_CASES = ('cifar100@64+float32', 'cifar100@64+bfloat16',
                 'cifar100@512+float32', 'cifar100@512+bfloat16',
                 'cifar100_fast', 'imagenet_perceiver@16')
# Same HLO, quicker XLA:CPU code generation: LLVM's optimisation level does
# not change the optimised HLO the cost analysis reads.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def compiler_options(platform):
  """FAST_COMPILE on CPUs; an accelerator's compile is left as it is."""
  return FAST_COMPILE if platform == 'cpu' else None


def step_cost(config, *, compiler_options=None, top=0):
  """Compiles `config`'s train step here; its cost and byte ranking.

  Returns:
    dict with `flops`, `bytes`, `model_flops` (analytic matmuls, as MFU
    counts them), `compile_s`, `by_category` and the `top` largest
    `fusions`.
  """
  # pylint: disable=g-import-not-at-top
  from benchmarks import flops as flops_lib
  from benchmarks import memory
  from benchmarks import train_program
  # pylint: enable=g-import-not-at-top
  start = time.perf_counter()
  step = train_program.build(config, abstract=True)
  compiled, _ = train_program.compile_step(step, compiler_options)
  result = flops_lib.xla_cost(compiled, step.mesh.devices.size)
  result['model_flops'] = flops_lib.analytic_train_flops_per_step(
      config, step.num_classes)
  # XLA's estimate of one device's memory for the step (here XLA:CPU's).
  result['memory_bytes'] = memory.compiled_memory_bytes(compiled)
  result['compile_s'] = time.perf_counter() - start
  rows = hlo_bytes.fusion_bytes(compiled.as_text()) if top else []
  result['by_category'] = hlo_bytes.bytes_by_category(rows)
  result['fusions'] = rows[:top]
  return result


def table(results, accelerators=ACCELERATORS):
  """Markdown: one row per case, one column per accelerator.

  Each accelerator's cell: the predicted step time, its bound and by how
  much (the larger term over the smaller), and the images/s it implies;
  `(!)` where XLA's memory estimate for the step (if known) exceeds the
  chip's HBM, so that this batch needs several chips or `remat`.
  """
  lines = ['| case | batch | dtype | GFLOP/step (XLA) | GB/step (XLA:CPU '
           'fusion) | FLOP/byte | ' + ' | '.join(a.name for a in accelerators)
           + ' | measured |',
           '| --- ' * (7 + len(accelerators)) + '|']
  for r in results:
    cells = []
    for acc in accelerators:
      p = predict(r['flops'], r['bytes'], peak_flops(acc, r['dtype']),
                  acc.bandwidth)
      cells.append(f"{p['time_s'] * 1e3:.2f} ms, {p['bound']} "
                   f"{p['ratio']:.1f}x ({r['batch'] / p['time_s']:,.0f}/s)"
                   + (' (!)' if (r.get('memory_bytes') or 0) > acc.memory
                      else ''))
    lines.append(
        f"| {r['case']} | {r['batch']} | {r['dtype']} | "
        f"{r['flops'] / 1e9:,.0f} | {r['bytes'] / 1e9:,.1f} | "
        f"{r['flops'] / r['bytes']:.0f} | " + ' | '.join(cells) +
        ' | not yet measured |')
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
  parser.add_argument('--top', type=int, default=0,
                      help='List the N fusions that access the most bytes.')
  parser.add_argument('--json', default='', help='Also write results here.')
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f'cost analysis on: {jax.device_count()} x {device.device_kind} '
        f'({device.platform}), jax {jax.__version__}')
  results = []
  for case in map(cases_lib.parse_case, args.cases.split(',')):
    if not case.exists():
      print(f'{case.spec}: skipped, {os.path.relpath(case.path, _ROOT)} does '
            'not exist.')
      continue
    config = case.config()
    r = step_cost(config, compiler_options=compiler_options(device.platform),
                  top=args.top)
    r.update(case=case.spec, batch=config.batch_size,
             dtype=config.get('dtype', 'float32'))
    results.append(r)
    print(f"{case.spec}: {r['flops'] / 1e9:,.1f} GFLOP (analytic matmuls "
          f"{r['model_flops'] / 1e9:,.1f}), {r['bytes'] / 1e9:,.2f} GB "
          f"accessed, memory estimate "
          f"{(r['memory_bytes'] or 0) / 2**30:,.1f} GiB; compiled in "
          f"{r['compile_s']:.0f} s")
    for category, num_bytes in r['by_category'].items():
      print(f'  {category}: {num_bytes / 1e9:,.2f} GB')
    for row in r['fusions']:
      print(f"  {row['bytes'] / 1e9:8.3f} GB  {row['category']:<20} "
            f"{row['shape']:<28} {row['op_name'][:90]}")
  print(table(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  cases_lib.input_errors_as_paragraphs(main)(sys.argv[1:])
