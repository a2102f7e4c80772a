"""Does a context-parallel config (experiments/sora_xl_minute.py) fit a TPU slice, and at what estimated
MFU? compile_check's method, with ring / all-to-all attention counted like a kernel.

    python -m sora_jax.bench.context_parallel --config experiments/sora_xl_minute.py
    python -m sora_jax.bench.context_parallel --config experiments/sora_xl_minute.py --skip_cost
    python -m sora_jax.bench.context_parallel --config experiments/sora_xl_minute.py:context=ulysses

Memory ("fits") is compile_check.check on the real step (layers scanned, as trained). The cost follows
compile_check.step_cost (unrolled at depths 1 and 2, extrapolated) for everything XLA's cost model sees.
The attentions do not count there: ring attention's local block-sparse kernel and the local kernels
of the other attentions are while loops, whose bodies the cost model counts once. So they are counted
by hand like compile_check counts Pallas kernels: dense per row (a minute-long row is one segment, so
no block is skipped), padded to 128, forward 2 matmuls (twice under full remat) and backward 7, at
`--kernel_efficiency` of peak; the one counted iteration of each loop is left in the XLA part (a
negligible overcount). MFU = flops.py's model FLOPs / (step time x chips x peak), as compile_check.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import flags
import jax

from sora_jax import compile_check, flops, sharding
from sora_jax import config as config_lib

# compile_check (imported above) defines --topology and --kernel_efficiency; these reuse them.
_TOPOLOGY = config_lib.flag(flags.DEFINE_string, "topology", "", "TPU slice; default: the config's "
                            "compile_check.topology")
_SKIP_COST = config_lib.flag(flags.DEFINE_bool, "skip_cost", False, "memory only (one compile, not three)")
_ONE_COMPILE = flags.DEFINE_bool("one_compile", False, "memory and a cost estimate from the real (scanned) "
                                 "step alone: the layers the scan's cost leaves out are timed at the "
                                 "counted work's FLOP rate (for machines too slow for three compiles)")
_EFFICIENCY = config_lib.flag(flags.DEFINE_float, "kernel_efficiency", 0.5, "fraction of peak assumed "
                              "for attention")


def _hand(cfg, num_params: int):
  d = cfg.data
  batch, seq_len, text_len, segs = int(d.batch_size), int(d.seq_len), int(d.text_len), int(d.max_segments)
  hand = flops.dit_train_step_flops(cfg, batch=batch, seq_len=seq_len, text_len=text_len,
                                    num_segments=segs, num_params=num_params)
  as_kernels = cfg.copy_and_resolve_references()
  as_kernels.dit.attention, as_kernels.dit.context = "splash", "none"  # flops.py's hand count of kernels
  kern = flops.kernel_flops(as_kernels, batch=batch, seq_len=seq_len, text_len=text_len,
                            num_segments=segs)
  return hand, kern


def estimate_one_compile(cfg, topology: str, *, kernel_efficiency: float = 0.5) -> dict:
  """Memory of the real step and a cost estimate from the same compile.

  The scanned step's cost counts the work outside the layers in full and one DiT and one text layer;
  XLA's seconds per FLOP on that counted work are applied to flops.py's count of all non-attention
  work, and attention is counted by hand as in `estimate`.
  """
  devices = compile_check.topology_devices(topology)
  mesh = sharding.mesh_from_config(cfg.mesh, devices)
  chips = len(devices)
  peak = flops.published_peak(devices[0])
  t0 = time.time()
  compiled, setup = compile_check.compile_train_step(cfg, mesh)
  compile_s = time.time() - t0
  mem = compile_check.memory(compiled)
  hbm = compile_check.hbm_bytes(devices[0])
  cost = compile_check.Cost.of(compiled)
  hand, kern = _hand(cfg, setup.num_params)
  non_attention = hand.total - kern.in_flops_py_total
  xla_s = cost.seconds * non_attention / max(cost.flops * chips, 1.0)
  attention_s = kern.executed / chips / (peak * kernel_efficiency)
  step_s = xla_s + attention_s
  return {"fits": mem["total"] <= hbm, "memory_gb_per_chip": mem["total"] / 1e9, "hbm_gb_per_chip": hbm / 1e9,
          "memory_gb": {k: v / 1e9 for k, v in mem.items()}, "chips": chips, "config_mesh": dict(mesh.shape),
          "params_b": setup.num_params / 1e9, "compile_s": compile_s, "peak_flops_per_chip": peak,
          "cost_method": "one scanned compile; uncounted layers at the counted work's FLOP rate",
          "xla_counted_tflops": cost.flops * chips / 1e12, "xla_counted_seconds": cost.seconds,
          "non_attention_tflops_flops_py": non_attention / 1e12, "xla_seconds": xla_s,
          "attention_tflops_executed": kern.executed / 1e12, "kernel_efficiency": kernel_efficiency,
          "attention_seconds": attention_s, "flops_per_step": hand.model, "estimated_step_s": step_s,
          "estimated_mfu": hand.model / (step_s * chips * peak)}


def estimate(cfg, topology: str, *, skip_cost: bool = False, kernel_efficiency: float = 0.5) -> dict:
  """compile_check's memory report for cfg plus (unless skip_cost) the cost with attention by hand."""
  devices = compile_check.topology_devices(topology)
  t0 = time.time()
  rep = compile_check.check(cfg, topology, devices=devices, skip_cost=True)
  rep["wall_s_memory"] = time.time() - t0
  if skip_cost or "compiler_error" in rep:
    return rep
  mesh = sharding.mesh_from_config(cfg.mesh, devices)
  chips, peak = len(devices), rep["peak_flops_per_chip"]
  hand, kern = _hand(cfg, int(rep["params_b"] * 1e9))
  t0 = time.time()
  cost, how = compile_check.step_cost(cfg, mesh, hand)
  attention_s = kern.executed / chips / (peak * kernel_efficiency)
  step_s = cost.seconds + attention_s
  xla_flops = cost.flops * chips
  rep.update(cost_compile_s=time.time() - t0, cost_method=how, xla_tflops_per_step=xla_flops / 1e12,
             hand_total_tflops_per_step=hand.total / 1e12,
             attention_tflops_counted=kern.in_flops_py_total / 1e12,
             attention_tflops_executed=kern.executed / 1e12, kernel_efficiency=kernel_efficiency,
             xla_seconds=cost.seconds, attention_seconds=attention_s,
             xla_over_flops_py_outside_attention=xla_flops / (hand.total - kern.in_flops_py_total),
             flops_per_step=hand.model, estimated_step_s=step_s,
             estimated_mfu=hand.model / (step_s * chips * peak))
  return rep


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  cfg = config_lib.get_config().copy_and_resolve_references()
  topology = _TOPOLOGY.value or cfg.compile_check.topology
  try:
    if _ONE_COMPILE.value:
      rep = estimate_one_compile(cfg, topology, kernel_efficiency=_EFFICIENCY.value)
    else:
      rep = estimate(cfg, topology, skip_cost=_SKIP_COST.value, kernel_efficiency=_EFFICIENCY.value)
  except ValueError as e:
    config_lib._fail(str(e))  # pylint: disable=protected-access
  rep.update(topology=topology, attention=cfg.dit.attention, context=cfg.dit.context,
             depth=int(cfg.dit.depth), seq_len=int(cfg.data.seq_len))
  print(json.dumps(rep, default=str))
  sys.exit(0 if rep.get("fits") else 1)


if __name__ == "__main__":
  config_lib.run(main)
