"""Where the XLA part of a train step spends its time: per-layer cost and the ops that move the most bytes.

    python -m sora_jax.bench.hbm_traffic --config experiments/sora_b.py --topology v5p:4x4x4
    python -m sora_jax.bench.hbm_traffic --config experiments/shapes_demo.py --topology cpu --top 20

compile_check's estimate is the compiler's time for the XLA-compiled part plus the Pallas kernels at an
assumed efficiency. On TPU the compiler's time for a DiT layer is close to its FLOPs at peak *plus* its
HBM bytes at the chip's bandwidth, so bytes that only move data (gathers, layout copies, scatter-adds)
cost as much as matmuls. This compiles the step with the layer stacks unrolled at depths (1, 1) and (2, 2)
(as compile_check does), prints one layer's FLOPs, bytes and compiler time against the roofline, and then
reads the depth-1 program's optimised HLO (dumped by XLA) and lists its instructions by bytes touched
(operands + outputs of each top-level instruction, fusion bodies not double-counted), grouped by the
JAX operation they came from. `--topology cpu` (the default) compiles for this machine (no libtpu needed; a smoke
check of the method, XLA:CPU fuses differently).

Byte counts are read from the HLO text: an approximation of the cost model's own "bytes accessed" (28.81
against 24.66 GB, 17% over, for sora_b's depth-1 step on v5p:4x4x4; docs/benchmarks.md), good for
ranking, not for absolute figures.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile

from absl import flags
import jax

from sora_jax import compile_check as cc
from sora_jax import config as config_lib
from sora_jax import flops, sharding

_TOP = flags.DEFINE_integer("top", 25, "instructions and op groups to list")

_BYTES = dict(pred=1, s8=1, u8=1, bf16=2, f16=2, s16=2, u16=2, f32=4, s32=4, u32=4, f64=8, s64=8, u64=8)
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_INST = re.compile(r"\s*(?:ROOT )?%(\S+) = (.*?) ([a-z\-]+)\((.*)$")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
               "partition-id", "replica-id", "while"}  # a while's state is counted by its body


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in `text` (a type, or a tuple of them)."""
  total = 0
  for ty, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[ty]
  return total


def _operands(rest: str) -> list[str]:
  depth, out = 0, []
  for ch in rest:
    if ch == "(":
      depth += 1
    elif ch == ")":
      if depth == 0:
        break
      depth -= 1
    out.append(ch)
  return re.findall(r"%([\w.\-]+)", "".join(out))


def hlo_traffic(hlo_text: str) -> list[tuple[int, str, str, str]]:
  """(bytes, opcode[:fusion kind], output type, JAX op name) of each top-level instruction of an
  optimised HLO module; instructions inside fusions and reducers are not counted separately."""
  types, comp_of, called, cur = {}, {}, set(), None
  lines = hlo_text.split("\n")
  for ln in lines:
    head = re.match(r"^(?:ENTRY )?%(\S+) .*\{\s*$", ln)
    if head:
      cur = head.group(1)
      continue
    m = _INST.match(ln)
    if m:
      types[m.group(1)], comp_of[m.group(1)] = m.group(2), cur
      called.update(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", ln))
  rows = []
  for ln in lines:
    m = _INST.match(ln)
    if not m or comp_of.get(m.group(1)) in called or m.group(3) in _NO_TRAFFIC:
      continue
    name, out_type, op, rest = m.groups()
    nbytes = shape_bytes(out_type) + sum(shape_bytes(types.get(o, "")) for o in _operands(rest))
    meta = re.search(r'op_name="([^"]*)"', ln)
    parts = re.sub(r"jit\([^)]*\)/", "", meta.group(1)).split("/") if meta else ["?"]
    skip = ("jvp", "transpose", "checkpoint", "remat", "rematted", "while", "body", "closed_call")
    jax_op = "/".join(p for p in parts if not p.startswith(skip)) or "?"
    kind = re.search(r"kind=(k\w+)", ln)
    rows.append((nbytes, op + (":" + kind.group(1) if kind else ""), out_type, jax_op))
  return rows


def main(argv):
  del argv
  dump = tempfile.mkdtemp(prefix="hbm_traffic_")
  # XLA reads its flags when the first backend starts: set before any compilation in this process.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                             " --xla_dump_hlo_module_re=.*train_step.*")
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  cfg = config_lib.get_config().copy_and_resolve_references()
  topo = cc._TOPOLOGY.value or "cpu"  # compile_check's --topology flag  # pylint: disable=protected-access
  devices = jax.devices("cpu")[:1] if topo == "cpu" else cc.topology_devices(topo)
  if topo == "cpu":
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1))
  mesh = sharding.mesh_from_config(cfg.mesh, devices)
  costs = cc.shallow_costs(cfg, mesh)
  layer = costs[2] - costs[1]
  peak = flops.published_peak(devices[0]) or flops.measure_cpu_peak(cfg.dit.dtype)
  try:
    bandwidth = cc._by_kind(cc.HBM_BANDWIDTH, devices[0], "HBM bandwidth")  # pylint: disable=protected-access
  except ValueError:  # a CPU
    bandwidth = float("nan")
  print(f"one DiT + one text layer, per chip: {layer.flops / 1e12:.3f} TFLOP ({layer.flops / peak * 1e3:.2f} ms "
        f"at peak), {layer.bytes / 1e9:.2f} GB ({layer.bytes / bandwidth * 1e3:.2f} ms at HBM bandwidth), "
        f"compiler {layer.seconds * 1e3:.2f} ms")
  files = sorted(glob.glob(os.path.join(dump, "*train_step*after_optimizations.txt")), key=os.path.getmtime)
  if not files:
    print(f"error: XLA wrote no optimised HLO under {dump} (XLA_FLAGS set too late?)", file=sys.stderr)
    sys.exit(1)
  rows = hlo_traffic(open(files[0]).read())  # the first compile: depth (1, 1)
  total = sum(r[0] for r in rows)
  print(f"depth-1 step, per chip: {total / 1e9:.2f} GB read from the HLO; compiler's bytes accessed "
        f"{costs[1].bytes / 1e9:.2f} GB; HLO: {files[0]}")
  by_op = collections.Counter()
  for nbytes, _, _, jax_op in rows:
    by_op[jax_op] += nbytes
  print("\nbytes by JAX operation:")
  for name, nbytes in by_op.most_common(_TOP.value):
    print(f"  {nbytes / 1e9:8.3f} GB  {name[:110]}")
  print("\nlargest instructions:")
  for nbytes, op, out_type, jax_op in sorted(rows, key=lambda r: -r[0])[:_TOP.value]:
    print(f"  {nbytes / 1e9:7.3f} GB  {op:18s} {out_type[:56]:56s} {jax_op[:60]}")


if __name__ == "__main__":
  config_lib.run(main)
