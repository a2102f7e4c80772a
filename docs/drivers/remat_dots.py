"""Where remat's recomputation goes in sora_b's step on v6e:8x8 (docs/history.md, Issue 8:
compiler / flops.py = 0.876 under `full_save_attention`).

    PYTHONPATH=. .venv/bin/python docs/drivers/remat_dots.py dots full_save_attention
        the dot_generals of the step as JAX lowers it (before XLA), stacks unrolled at depth 1: one line
        per (operand shapes -> result shape) with its count; `diff` two policies' outputs
    PYTHONPATH=. .venv/bin/python docs/drivers/remat_dots.py cost full_save_attention [prevent_cse]
        compile_check's per-chip FLOPs of one DiT + text layer pair (`shallow_costs`), optionally with
        `jax.checkpoint(prevent_cse=True)` forced, so that XLA cannot merge the unrolled recomputation
        into the first forward
"""
import collections
import re
import sys

import jax

from experiments import sora_b
from sora_jax import compile_check, flops, sharding

mode, remat = sys.argv[1], sys.argv[2]
jax.config.update("jax_platforms", "cpu")
if "prevent_cse" in sys.argv[3:]:
  checkpoint = jax.checkpoint
  jax.checkpoint = lambda f, **kw: checkpoint(f, **{**kw, "prevent_cse": True})
cfg = sora_b.get_config("topology=v6e:8x8")
cfg.dit.remat = remat
mesh = sharding.mesh_from_config(cfg.mesh, compile_check.topology_devices("v6e:8x8", 1))

if mode == "cost":
  c = compile_check.shallow_costs(cfg.copy_and_resolve_references(), mesh)
  print(f"{remat}: one layer pair {(c[2] - c[1]).flops / 1e12:.4f} TFLOP per chip")
else:
  class Lowered(Exception):
    pass

  def keep(self, *args, **kwargs):  # stop at the lowered program: no compile needed
    raise Lowered(self.as_text())

  jax.stages.Lowered.compile = keep
  try:
    with flops.unrolled_scans():
      compile_check.compile_train_step(compile_check._with_depths(cfg, 1, 1), mesh)  # pylint: disable=protected-access
  except Lowered as e:
    text = e.args[0]
  print(f"optimization barriers: {text.count('optimization_barrier')}")
  dots = collections.Counter(m.group(1) for m in re.finditer(
      r"dot_general.*?\((tensor<[^)]*\)\s*->\s*tensor<[^>]*>)", text))
  for shapes, n in sorted(dots.items()):
    print(n, shapes)
  print(f"{len(dots)} kinds of dot_general, {sum(dots.values())} in all")
