r"""The accelerator check in one command: do the fast paths agree, how fast?

Preparation, once, on a machine with network access: the accelerator images
have jax, flax, optax, orbax, chex and numpy but no ml_collections, which the
configs import, so its pure-Python wheel travels in the (git-ignored) `.whl/`
folder and this script imports it from there (absl comes with chex/optax):

  pip download ml_collections==1.1.0 absl-py --no-deps -d .whl

Command (the whole tree, `.whl/` included, on the accelerator machine):

  python benchmarks/device_check.py --out=DIR

It installs nothing and imports neither tensorflow nor tfds. Four sections,
each with a time budget (PLAN), write `DIR/device_check.json` and `.md`
after every section (a run cut short keeps what it measured):

1. setup: the dense matmul peak in float32 and bfloat16, and the memory
   bandwidth.
2. checks: each fast path against the float32 step of the seed model
   (`fast_paths.py`: bfloat16, remat, Keras' factored order, cuDNN on GPUs)
   over a few real train steps from one initial state.
3. seed: the seed's train step in float32 and bfloat16 at batch 64, then
   at doubling batches while they fit and pay (`step_bench.batch_sweep`).
4. configs: `--configs`, each a case `CONFIG[:ARG][@BATCH][+DTYPE]`
   (benchmarks/cases.py; default cifar100_fast at its own batch and the
   paper's ImageNet model at batch 16); a missing config file is a note.

Every configuration compiles once; nothing starts after `--max_minutes`
(6.5), so the command is planned to end within about 8 minutes (a compile
under way then still finishes; not yet timed on an accelerator). Each
timed case reports images/s, step time, MFU against the measured peak,
XLA's FLOPs and bytes with the roofline time they predict, device memory,
and the time of one 45,000-image epoch and of 45 epochs
(`step_bench.time_program`). BENCHMARKS.md ("Device check") gives the
budget per section and how to run it.

`--smoke` runs every section on the CPU in seconds (a tiny model, tiny
batches, one step per case); the test suite runs it without tensorflow or an
installed ml_collections, so the script is known to work before an
accelerator is at hand.
"""

import datetime
import glob
import inspect
import os
import sys
import time

# Run as a script from anywhere: make the repository root importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)


def _add_wheels(argv):
  """Puts the wheels of `--wheels=DIR` (default .whl/) on sys.path, last.

  Pure-Python wheels import from the zip. Appended, so installed packages
  win; read from argv by hand because absl itself may come from there.
  """
  folder = os.path.join(_ROOT, '.whl')
  for arg in argv[1:]:
    if arg.startswith('--wheels='):
      folder = arg.split('=', 1)[1]
  for path in sorted(glob.glob(os.path.join(folder, '*.whl'))):
    if path not in sys.path:
      sys.path.append(path)
  return folder


WHEELS = _add_wheels(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jaxlib

from benchmarks import cases
from benchmarks import device_report
from benchmarks import fast_paths
from benchmarks import roofline
from benchmarks import step_bench
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
# Sections and their planned minutes (see the module docstring).
PLAN = (('setup', 0.5), ('checks', 2.0), ('seed', 2.5), ('configs', 1.5))
# What each section compiles, for the plan printed at the start.
PROGRAMS = {'setup': 'two matmuls and an add',
            'checks': '4 train steps, 6 on GPUs',
            'seed': 'about 3-4 train steps per dtype',
            'configs': 'one train step per config'}
# The tiny model --smoke gives every config (configs/fake_data.py's).
SMOKE_MODEL = dict(image_size=16, patch_size=4, latent_dim=8,
                   projection_dim=16, num_heads=2, ffn_units=(16, 16),
                   num_transformer_blocks=1, num_iterations=1,
                   classifier_units=(16,))


def _define_flags():
  """Defined only when run as a script, so tests can import this module."""
  flags.DEFINE_string('out', None, 'Directory for device_check.json and '
                      'device_check.md (created).')
  flags.DEFINE_string('wheels', WHEELS, 'Folder of pure-Python wheels put on '
                      'sys.path after the installed packages.')
  flags.DEFINE_float('max_minutes', 6.5, 'Sections that cannot start before '
                     'this are skipped; a section stops when its own budget '
                     '(PLAN, plus what earlier sections left) runs out.')
  flags.DEFINE_float('plan_scale', 1.0, 'Multiplies every section\'s '
                     'planned minutes (PLAN), e.g. for a slower machine.')
  flags.DEFINE_list('sections', [name for name, _ in PLAN],
                    'Sections to run.')
  flags.DEFINE_string('seed_config', 'configs/cifar100.py',
                      'The config the checks and the batch sweep use '
                      '(CONFIG[:ARG], see benchmarks/cases.py).')
  flags.DEFINE_list('configs', ['cifar100_fast', 'imagenet_perceiver@16'],
                    'Further configs to time, each a case '
                    f'{cases.SPELLING} (benchmarks/cases.py: ARG as '
                    "main.py's --config=PATH:ARG; BATCH and DTYPE: default "
                    "the config's own); missing files are skipped.")
  flags.DEFINE_integer('check_batch', 64, 'Global batch of the checks.')
  flags.DEFINE_integer('check_steps', 3, 'Train steps compared per path.')
  flags.DEFINE_integer('sweep_start', 64, 'First batch of the sweep.')
  flags.DEFINE_integer('sweep_max', 4096, 'Largest batch the sweep tries.')
  flags.DEFINE_float('min_gain', 0.05, 'The sweep stops at a batch less '
                     'than this much faster (images/s) than the best one.')
  flags.DEFINE_integer('steps', 20, 'Timed steps per case (median).')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
  flags.DEFINE_integer('compile_threads', 3, 'Programs compiled at once.')
  flags.DEFINE_integer('peak_matmul_size', 0, 'Side of the matmul timed for '
                       'the peak; 0: 2048 on CPU, 8192 on accelerators.')
  flags.DEFINE_integer('bandwidth_bytes', 2**30, 'Array size of the memory '
                       'bandwidth measurement.')
  flags.DEFINE_bool('smoke', False, 'Tiny everything, one step per case, on '
                    'the CPU: for the test suite.')
  flags.mark_flags_as_required(['out'])


# --------------------------------------------------------------------------
# Configs.


def smoke_config(case):
  """A tiny version of a case's config: its own 'test' variant where it has
  one (`get_config('test')`), else its options on configs/fake_data.py's
  model; the case's dtype either way.
  """
  get_config = cases.config_module(case.path).get_config
  if case.arg is None and inspect.signature(get_config).parameters:
    config = get_config('test')
  else:
    config = cases.variant(case.config(), **SMOKE_MODEL)
  return config if case.dtype is None else cases.variant(config,
                                                         dtype=case.dtype)


# --------------------------------------------------------------------------
# The run.


def run(argv_flags, log=print):
  """All sections; returns the results dict (also written to --out)."""
  f = argv_flags
  smoke = f.smoke
  devices = jax.devices()
  device = devices[0]
  results = {
      'environment': {
          'date': datetime.datetime.now(datetime.timezone.utc).strftime(
              '%Y-%m-%d %H:%M UTC'),
          'command': ' '.join(['python', 'benchmarks/device_check.py'] +
                              sys.argv[1:]),
          'devices': len(devices), 'device_kind': device.device_kind,
          'platform': device.platform, 'processes': jax.process_count(),
          'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
          'python': sys.version.split()[0],
          # Where the configs' ml_collections came from (installed or .whl).
          'ml_collections': getattr(sys.modules.get('ml_collections'),
                                    '__file__', None),
          'xla_flags': os.environ.get('XLA_FLAGS', '')},
      'plan_minutes': dict(PLAN), 'max_minutes': f.max_minutes,
      'tolerances': dict(fast_paths.TOLERANCES,
                         cosine=fast_paths.MIN_COSINE),
      'sections': [], 'checks': [], 'timings': [], 'notes': []}
  clock = step_bench.Clock(f.max_minutes, log)
  log(f'devices: {len(devices)} x {device.device_kind} ({device.platform}); '
      f'jax {jax.__version__}')
  log('plan: ' + '; '.join(f'{n} {m * f.plan_scale:g} min ({PROGRAMS[n]})'
                           for n, m in PLAN) +
      f'; nothing starts after {f.max_minutes:g} min')
  compiler_options = roofline.compiler_options(device.platform)
  bench = step_bench.Bench(compiler_options, f.compile_threads, log)
  steps, warmup = (1, 0) if smoke else (f.steps, f.warmup)

  def with_batch(config, batch):
    return cases.variant(config, batch_size=batch)

  seed_case = cases.parse_case(f.seed_config)
  seed = seed_case.config()
  if smoke:
    seed = cases.variant(seed, **SMOKE_MODEL)
  seed_name = seed_case.label
  n = len(devices)
  check_batch = n if smoke else f.check_batch
  sweep_start = n if smoke else f.sweep_start
  sweep_max = 2 * n if smoke else f.sweep_max
  peaks = None

  def section(name, body):
    planned = dict(PLAN)[name] * f.plan_scale
    entry = {'name': name, 'planned_s': 60 * planned, 'status': 'running'}
    results['sections'].append(entry)
    if name not in f.sections:
      entry['status'] = 'not asked for (--sections)'
      return
    if clock.end - time.perf_counter() < 10:
      entry['status'] = f'skipped: --max_minutes={f.max_minutes:g} reached'
      log(f'== {name}: {entry["status"]}')
      return
    clock.begin(name, planned)
    try:
      entry['status'] = body() or 'done'
    except Exception as e:  # pylint: disable=broad-except
      entry['status'] = 'failed: ' + step_bench.short_error(e)
      log(f'== {name}: {entry["status"]}')
    entry['spent_s'] = clock.finish(name)
    device_report.write(results, f.out)

  def setup():
    nonlocal peaks
    peaks = step_bench.measure_peaks(
        bench, 128 if smoke else f.peak_matmul_size,
        2**20 if smoke else f.bandwidth_bytes)
    results['peaks'] = peaks
    log(f"matmul peak: float32 "
        f"{peaks['matmul_peak_flops']['float32'] / 1e12:.2f}, bfloat16 "
        f"{peaks['matmul_peak_flops']['bfloat16'] / 1e12:.2f} TFLOP/s; "
        f"bandwidth {peaks['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s")

  def checks():
    base = with_batch(seed, check_batch)
    results['check_setup'] = {'config': f.seed_config, 'batch': check_batch,
                              'steps': 1 if smoke else f.check_steps}
    rows, status = fast_paths.check_all(
        bench, fast_paths.check_paths(base, smoke), seed_name,
        results['check_setup']['steps'], steps, clock.deadline, log)
    results['checks'] += rows
    return status

  def time_and_log(program, label):
    row = step_bench.time_program(bench, program, label, steps, warmup,
                       peaks['matmul_peak_flops'],
                       peaks['bandwidth_bytes_per_s'])
    results['timings'].append(row)
    log(f"  {row['config']} {row['dtype']} batch {row['batch']}: "
        + (f"{row['images_per_sec']:,.0f} images/s, {row['step_ms']:.2f} ms,"
           f" MFU {row['mfu']:.3f}" if 'images_per_sec' in row
           else row.get('note', '')))
    return row

  def sweep():
    for dtype in ('float32', 'bfloat16'):

      def run_wave(batches, dtype=dtype):
        """Compiles `batches` together, then times them one by one."""
        programs = bench.programs(
            [(seed_name, cases.variant(with_batch(seed, b), dtype=dtype))
             for b in batches],
            deadline=clock.deadline)
        for program in programs:
          yield time_and_log(program, seed_name)

      _, best, reason = step_bench.batch_sweep(
          sweep_start, sweep_max, bench.threads, f.min_gain, run_wave,
          lambda: time.perf_counter() > clock.deadline)
      log(f"  {dtype}: best batch {best['batch'] if best else 'none'}; "
          f'sweep ended: {reason}')
      device_report.write(results, f.out)
      if reason == 'out of time':
        return 'out of time'
    return 'done'

  def other_configs():
    specs, status = [], 'done'
    for case in map(cases.parse_case, f.configs):
      if not case.exists():
        note = (f'{os.path.relpath(case.path, _ROOT)} does not exist (yet): '
                'not timed.')
        results['notes'].append(note)
        log('  ' + note)
        continue
      config = (with_batch(smoke_config(case), n) if smoke
                else case.config())
      specs.append((case.label, config))
    programs = bench.programs(specs, deadline=clock.deadline)
    for spec, program in zip(specs, programs):
      if time.perf_counter() > clock.deadline:
        status = 'out of time'
        break
      time_and_log(program, spec[0])
    return status

  def timed(body):
    """The timing sections need the peaks of the setup section."""
    return body if peaks is not None else (
        lambda: 'skipped: no peaks measured (setup did not run)')

  section('setup', setup)
  section('checks', checks)
  section('seed', timed(sweep))
  section('configs', timed(other_configs))
  results['environment']['total_s'] = clock.elapsed()
  device_report.write(results, f.out)
  log(f'total: {clock.elapsed():.0f} s; wrote '
      f"{os.path.join(f.out, 'device_check.json')} and device_check.md")
  print(device_report.markdown(results))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  run(FLAGS)


if __name__ == '__main__':
  _define_flags()
  app.run(cases.input_errors_as_paragraphs(main))
