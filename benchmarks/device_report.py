"""The device check's outputs: a JSON of everything and a markdown report."""

import json
import math
import os

from benchmarks import fast_paths
from benchmarks import step_bench

def _fmt(value, spec, scale=1.0):
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ''
  return format(value * scale, spec)


def markdown(results):
  """The report: environment, sections, checks and timings."""
  env, peaks = results['environment'], results.get('peaks') or {}
  lines = [f"# Device check: {env['devices']} x {env['device_kind']} "
           f"({env['platform']}), {env['date']}", '',
           f"Command: `{env['command']}`; jax {env['jax']}, jaxlib "
           f"{env['jaxlib']}, Python {env['python']}.", '']
  if peaks:
    matmul = peaks['matmul_peak_flops']
    lines += [f"Measured: dense matmul peak ({peaks['matmul_size']}^3, best "
              f"of 5, all devices) float32 {matmul['float32'] / 1e12:.1f} "
              f"and bfloat16 {matmul['bfloat16'] / 1e12:.1f} TFLOP/s; "
              f"memory bandwidth (x + 1) "
              f"{peaks['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s.", '']
  lines += ['| section | planned s | spent s | status |',
            '| --- | --- | --- | --- |']
  for s in results['sections']:
    lines.append(f"| {s['name']} | {s['planned_s']:.0f} | "
                 f"{_fmt(s.get('spent_s'), '.0f')} | {s['status']} |")
  if results['checks']:
    c, tol = results['check_setup'], fast_paths.TOLERANCES
    lines += ['', f"## Fast paths against the float32 step ({c['config']}, "
              f"batch {c['batch']}, {c['steps']} steps from one initial "
              'state)', '',
              f"Relative errors, worst step; bounds: loss {tol['loss']:g}, "
              f"gradient norm {tol['grad_norm']:g}, update "
              f"{tol['update']:g}, cosine >= {fast_paths.MIN_COSINE} "
              '(fast_paths.TOLERANCES says why).',
              '', '| path | against | loss | grad norm | update | cosine | '
              'verdict | step ms |', '| --- | --- | --- | --- | --- | --- | '
              '--- | --- |']
    for r in results['checks']:
      lines.append(
          f"| {r['path']} | {r.get('against') or ''} | "
          f"{_fmt(r.get('loss'), '.2e')} | {_fmt(r.get('grad_norm'), '.2e')} "
          f"| {_fmt(r.get('update'), '.2e')} | {_fmt(r.get('cosine'), '.4f')}"
          f" | {r['verdict']} | {_fmt(r.get('step_ms'), '.2f')} |")
  if results['timings']:
    lines += ['', '## Train step', '',
              '`*` after the peak memory: this case raised the process peak, '
              'so it is its own. Roofline: max(XLA FLOPs / measured peak, '
              'XLA bytes / measured bandwidth).', '',
              '| config | dtype | batch | images/s | step ms | MFU | '
              'roofline ms (bound) | peak memory GiB | XLA estimate GiB | '
              f'epoch ({step_bench.EPOCH_IMAGES:,} images) s | '
              f'{step_bench.EPOCHS} epochs min | '
              'compile s | note |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | '
              '--- | --- | --- |']
    for r in results['timings']:
      roof = (f"{r['roofline_ms']:.2f} ({r['roofline_bound']})"
              if 'roofline_ms' in r else '')
      mark = '*' if r.get('peak_memory_is_this_case') else ''
      lines.append(
          f"| {r['config']} | {r['dtype']} | {r['batch']} | "
          f"{_fmt(r.get('images_per_sec'), ',.0f')} | "
          f"{_fmt(r.get('step_ms'), '.2f')} | {_fmt(r.get('mfu'), '.3f')} | "
          f"{roof} | {_fmt(r.get('peak_memory_bytes'), '.2f', 2**-30)}{mark}"
          f" | {_fmt(r.get('xla_memory_bytes'), '.2f', 2**-30)} | "
          f"{_fmt(r.get('epoch_s'), ',.1f')} | "
          f"{_fmt(r.get('epochs_min'), ',.1f')} | "
          f"{_fmt(r.get('compile_s'), '.0f')} | "
          f"{'best batch. ' if r.get('best') else ''}{r.get('note', '')} |")
  if results['notes']:
    lines += ['', '## Notes', ''] + [f'- {n}' for n in results['notes']]
  return '\n'.join(lines) + '\n'


def write(results, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'device_check.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(out, 'device_check.md'), 'w') as f:
    f.write(markdown(results))
