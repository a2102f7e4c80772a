"""bench.hbm_traffic reads bytes per instruction from optimised HLO text: operands + outputs of top-level
instructions, fusion bodies not counted again, grouped by the JAX op that produced them."""
from sora_jax.bench import hbm_traffic

HLO = """HloModule jit_train_step

%fused_computation (param_0: bf16[4,8]) -> bf16[4,8] {
  %param_0 = bf16[4,8]{1,0} parameter(0)
  ROOT %add.9 = bf16[4,8]{1,0} add(%param_0, %param_0), metadata={op_name="jit(train_step)/inner"}
}

ENTRY %main (p0: bf16[4,8], p1: f32[8,16]) -> (f32[4,16]) {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %fusion.1 = bf16[4,8]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(train_step)/jvp()/while/body/closed_call/add"}
  %convert.2 = f32[4,8]{1,0} convert(%fusion.1)
  %dot.3 = f32[4,16]{1,0} dot(%convert.2, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp())/blhd,hdo->blo/dot_general"}
  ROOT %tuple.4 = (f32[4,16]{1,0}) tuple(%dot.3)
}
"""


def test_bytes_per_instruction_from_hlo_text():
  rows = {r[3]: r for r in hbm_traffic.hlo_traffic(HLO)}
  assert hbm_traffic.shape_bytes("(bf16[4,8], f32[2])") == 4 * 8 * 2 + 2 * 4
  assert rows["add"][0] == 2 * 64 and rows["add"][1] == "fusion:kLoop"  # in + out, body not again
  assert rows["blhd,hdo->blo/dot_general"][0] == 4 * 8 * 4 + 8 * 16 * 4 + 4 * 16 * 4   # both operands + output
  assert rows["?"][0] == 64 + 128  # the unnamed convert; parameters and the tuple move nothing
  assert len(rows) == 3
