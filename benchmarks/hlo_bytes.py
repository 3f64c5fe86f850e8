"""Bytes per instruction of a compiled program, read from its HLO text.

XLA's cost analysis gives one total of bytes accessed; ranking the entry
computation's fusions by the bytes they read and write shows where a
memory-bound step spends them (benchmarks/roofline.py `--top`).
"""

import math
import re

_BYTES_PER_ELEMENT = {
    'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1,
    'f8e5m2': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
    'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
}
_ARRAY = re.compile(r'\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]')
_FREE = ('parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast',
         'after-all', 'partition-id', 'replica-id')


def shape_bytes(shape):
  """Bytes of an HLO shape string such as `(f32[2,3]{1,0}, s32[])`."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = _BYTES_PER_ELEMENT.get(dtype)
    if size is not None:
      total += size * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _split_instruction(line):
  """`(name, shape, opcode, operand names, rest)` of an HLO line, or None."""
  match = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*', line)
  if not match:
    return None
  text = line[match.end():]
  if text.startswith('('):  # A tuple shape: up to its closing parenthesis.
    depth = 0
    for i, char in enumerate(text):
      depth += {'(': 1, ')': -1}.get(char, 0)
      if depth == 0:
        break
    shape, text = text[:i + 1], text[i + 1:].lstrip()
  else:
    shape, _, text = text.partition(' ')
  opcode, _, text = text.partition('(')
  depth, operands = 1, ''
  for i, char in enumerate(text):
    depth += {'(': 1, ')': -1}.get(char, 0)
    if depth == 0:
      operands, text = text[:i], text[i + 1:]
      break
  names = re.findall(r'%([\w.\-]+)', operands)
  return match.group(1), shape, opcode.strip(), names, text


def _computations(hlo_text):
  """`{name: [lines]}` of every computation, and the entry's name."""
  bodies, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    header = re.match(r'(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$', line)
    if header and not line.startswith(' '):
      current = header.group(2)
      bodies[current] = []
      if header.group(1):
        entry = current
    elif line.startswith('}'):
      current = None
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def _category(opcode, rest, bodies):
  """What an entry instruction does: matmul, softmax-like, reduction, ..."""
  if opcode in ('dot', 'convolution'):
    return 'matmul'
  if opcode == 'custom-call':
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    name = target.group(1) if target else ''
    return 'matmul' if re.search(r'gemm|matmul|cublas', name, re.I) else (
        f'custom-call {name}')
  if opcode in ('copy', 'transpose'):
    return 'copy/transpose'
  if opcode != 'fusion':
    return opcode
  called = re.search(r'calls=%([\w.\-]+)', rest)
  body = '\n'.join(bodies.get(called.group(1), ())) if called else ''
  if re.search(r' (dot|convolution)\(|custom_call_target="[^"]*(gemm|matmul)',
               body):
    return 'matmul fusion'
  if ' exponential(' in body and ' reduce(' in body:
    return 'softmax-like fusion'
  if ' reduce(' in body:
    return 'reduction fusion'
  return 'elementwise fusion'


def fusion_bytes(hlo_text):
  """Bytes each top-level instruction of the entry computation accesses.

  An instruction reads its operands and writes its result (XLA's cost
  model for a fusion, which may count a partly read operand less);
  parameters, constants, tuples and bitcasts move nothing. Sums a little
  above or below XLA's total ('bytes accessed'); used to rank, not to time.

  Returns:
    list of dicts (`name`, `category`, `bytes`, `shape`, `op_name`),
    most bytes first.
  """
  bodies, entry = _computations(hlo_text)
  shapes, rows = {}, []
  for line in bodies.get(entry, ()):
    parsed = _split_instruction(line)
    if parsed is None:
      continue
    name, shape, opcode, operands, rest = parsed
    shapes[name] = shape
    if opcode in _FREE:
      continue
    num_bytes = shape_bytes(shape) + sum(shape_bytes(shapes.get(o, ''))
                                         for o in operands)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    rows.append({'name': name, 'category': _category(opcode, rest, bodies),
                 'bytes': num_bytes, 'shape': shape.split('{')[0],
                 'op_name': op_name.group(1) if op_name else ''})
  return sorted(rows, key=lambda r: -r['bytes'])


def bytes_by_category(rows):
  """`{category: bytes}` of `fusion_bytes` rows, largest first."""
  totals = {}
  for row in rows:
    totals[row['category']] = totals.get(row['category'], 0) + row['bytes']
  return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
