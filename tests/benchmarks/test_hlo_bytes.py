"""benchmarks/hlo_bytes.py: bytes per instruction, written and compiled HLO."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops
from benchmarks import hlo_bytes

# Same HLO, quicker XLA:CPU code generation; the cost analysis is the same.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


HLO = """HloModule m

%fused_computation (p0: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %e = f32[4,8]{1,0} exponential(%p0)
}

ENTRY %main (a: f32[4,8], b: bf16[8,2]) -> (f32[4,2], f32[4,8]) {
  %a = f32[4,8]{1,0} parameter(0)
  %b = bf16[8,2]{1,0} parameter(1)
  %c = f32[8,2]{1,0} convert(%b)
  %dot = f32[4,2]{1,0} dot(%a, %c), lhs_contracting_dims={1}, \
rhs_contracting_dims={0}
  %fusion = f32[4,8]{1,0} fusion(%a), kind=kLoop, \
calls=%fused_computation, metadata={op_name="jit(f)/exp"}
  ROOT %t = (f32[4,2]{1,0}, f32[4,8]{1,0}) tuple(%dot, %fusion)
}
"""


def test_fusion_bytes_of_a_written_out_module():
  rows = {r['name']: r for r in hlo_bytes.fusion_bytes(HLO)}
  # Parameters and tuples move nothing; every other instruction reads its
  # operands and writes its result.
  assert set(rows) == {'c', 'dot', 'fusion'}
  assert rows['c']['bytes'] == 8 * 2 * 2 + 8 * 2 * 4
  assert rows['dot']['bytes'] == 4 * 8 * 4 + 8 * 2 * 4 + 4 * 2 * 4
  assert rows['fusion']['bytes'] == 2 * 4 * 8 * 4
  assert rows['dot']['category'] == 'matmul'
  assert rows['fusion']['category'] == 'elementwise fusion'
  assert rows['fusion']['op_name'] == 'jit(f)/exp'
  assert hlo_bytes.shape_bytes('(f32[2,3]{1,0}, s32[], pred[5])') == 24 + 4 + 5


def test_fusion_bytes_add_up_to_xla_bytes_accessed():
  """Parsed per instruction, the bytes sum to XLA's own total."""
  def f(x, w):
    y = jax.nn.relu(x @ w) + 1
    return jax.nn.softmax(y, axis=-1) @ w.T

  args = (jnp.ones((64, 32)), jnp.ones((32, 16)))
  compiled = jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)
  rows = hlo_bytes.fusion_bytes(compiled.as_text())
  total = flops.xla_cost(compiled)['bytes']
  assert sum(r['bytes'] for r in rows) == pytest.approx(total, rel=0.02)
  categories = hlo_bytes.bytes_by_category(rows)
  assert sum(categories.values()) == sum(r['bytes'] for r in rows)
  assert any('matmul' in c for c in categories), categories
