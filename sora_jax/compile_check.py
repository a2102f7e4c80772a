"""Compiles the real DiT train step ahead of time for a TPU slice you do not have, and says whether it
fits and how fast the compiler thinks it runs.

    python -m sora_jax.compile_check --config experiments/sora_xl.py --topology v5p:8x8x4
    python -m sora_jax.compile_check --config experiments/sora_b.py --topology v5p:4x4x4 --plan

Needs libtpu next to jax (`pip install -e '.[tpu]'`); no TPU: `get_topology_desc` describes the slice and
XLA's TPU compiler lowers, partitions and schedules the step for it on this CPU. Nothing is allocated:
the state and batch are `jax.ShapeDtypeStruct`s with their shardings (train.make_setup), and the step is
train.make_train_step compiled by train.compile_step, the same function the trainer runs.

The estimate, and what makes it honest (docs/pods.md has the long form):
- Memory per chip is `memory_analysis()` of the real step (layers scanned, as trained): arguments +
  outputs - donated aliases + temporaries + code, against the chip's HBM. XLA itself refuses to compile a
  program larger than HBM, so "fits" is also the compiler's verdict.
- `cost_analysis()` counts a `lax.scan` body once, not once per layer, while work on the stacked
  per-layer arrays outside the loop counts in full, so the scanned count cannot be rescaled. The step is
  compiled again with the layer stacks unrolled at depths (1, 1) and (2, 2) (DiT, text encoder); the
  difference is one layer of each (split by flops.py's per-layer ratio), and FLOPs, bytes and the
  compiler's time are extrapolated to the real depths (identical layers: cost is affine in depth).
  `--unroll` compiles the full-depth unrolled step instead (slow; a check of the extrapolation).
- Pallas kernels (splash attention) are custom calls the cost model does not see (it reports no FLOPs
  for them). Their FLOPs are counted here by hand from the kernel's algorithm (forward 2 matmuls; backward
  5 in splash's fused kernel (whole or over query chunks), or 7 in separate dkv and dq kernels, per call
  as `splash.layout` decides from the call's shapes, always 7 for the GPU kernels; the forward
  again under a remat policy that does not save the kernel's residuals), for rows holding one segment
  each (the densest packing, where splash skips no block), and their time is those FLOPs at
  `--kernel_efficiency` of peak.
- The compiler's FLOPs (XLA-counted part, times chips) must agree with flops.py's count of the same
  work (flops.py's total minus the kernels' share) within 10%; the run fails otherwise.
- MFU = flops.py's model FLOPs (no remat, dense attention = one segment per row) / (step time x chips x
  peak): remat and the kernel's extra backward matmuls cost time but are not counted as useful work.

The last line printed is one JSON object (keys in the module's `report()`); the exit status is 1 when
the step does not fit in HBM, 2 on bad input, 3 when the FLOP check fails.
`check()` returns the report as a dict (the JSON keys are JSON_KEYS).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from typing import Sequence

from absl import flags
import jax
import ml_collections
import numpy as np

from sora_jax import config as config_lib
from sora_jax import distributed, flops, sharding, train
from sora_jax.kernels import splash
from sora_jax.models import layers

_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice, e.g. v5p:8x8x4 or v6e:16x16; "
                                "default: the config's compile_check.topology")
_PLAN = flags.DEFINE_bool("plan", False, "choose remat policy and FSDP/TP sizes that fit, then check")
_UNROLL = flags.DEFINE_bool("unroll", False, "cost from the fully unrolled step (slow) instead of "
                            "extrapolating from shallow unrolled compiles")
_KERNEL_EFFICIENCY = flags.DEFINE_float("kernel_efficiency", 0.5, "fraction of peak assumed for Pallas "
                                        "attention kernels, whose cost XLA's model does not see")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (multi-slice)")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "compile the real step once: memory and fit "
                                 "only, no cost estimate")

log = logging.getLogger("sora_jax.compile_check")

# HBM per chip in bytes (data sheets, decimal GB: a little under what XLA allows, so "fits" is cautious),
# matched as substrings of device_kind, most specific first.
HBM_BYTES: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 32e9),
    ("TPU v5 lite", 16e9),
    ("TPU v5", 95e9),       # v5p
    ("TPU v4", 32e9),
)
# Published HBM bandwidth per chip (bytes/s), for the roofline used when the compiler's own time
# estimate is unusable (libtpu 0.0.52 reports negative `optimal_seconds` for v6e steps).
HBM_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 1640e9),
    ("TPU v5 lite", 819e9),
    ("TPU v5", 2765e9),     # v5p
    ("TPU v4", 1200e9),
)
FLOP_TOLERANCE = 0.10
JSON_KEYS = ("fits", "memory_gb_per_chip", "hbm_gb_per_chip", "chips", "peak_flops_per_chip",
             "flops_per_step", "estimated_step_s", "estimated_mfu")
# Matmuls an attention-kernel call executes, in units of one [L, L] x [L, d] product over all heads:
# forward QK^T and PV; backward, splash's fused kernel (QK^T, dO V^T, P^T dO, dS^T Q, dS K; whole or
# over query chunks) where `splash.layout` picks it, else separate dkv (QK^T, dO V^T, P^T dO,
# dS^T Q) and dq (QK^T, dO V^T, dS K) kernels, as the GPU kernels always run. The forward runs again in
# the backward pass unless the remat policy saves its residuals (layers.KERNEL_FORWARD_ONCE).
KERNEL_FWD_MATMULS = 2
KERNEL_BWD_MATMULS = {"fused": 5, "separate": 7}


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The (abstract) devices of a TPU slice name such as "v5p:4x4x4" ("2xv5p:8x8x4": two such slices
  over DCN); libtpu must be installed."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  m = re.fullmatch(r"(\d+)x(v.*)", topology)
  if m:
    num_slices, topology = num_slices * int(m.group(1)), m.group(2)
  # libtpu takes a lock file per host; another process compiling here must not block this one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  except Exception as e:  # libtpu missing, or a name it does not know
    raise ValueError(f"topology {topology!r}: {str(e).splitlines()[0][:200]} (install the tpu extra; "
                     "names look like v5p:4x4x4, v6e:16x16, v5e:8x8)") from None
  return list(desc.devices)


def _by_kind(table, device, what: str) -> float:
  kind = getattr(device, "device_kind", "")
  for name, value in table:
    if name in kind:
      return value
  raise ValueError(f"no {what} for device kind {kind!r}; known: {[k for k, _ in table]}")


def hbm_bytes(device) -> float:
  return _by_kind(HBM_BYTES, device, "HBM size")


def abstract_batch(cfg) -> dict:
  """A global packed batch (docs/architecture.md keys) as zero-stride numpy views: shapes, no memory."""
  d = cfg.data
  b, l, lt, s, dim = int(d.batch_size), int(d.seq_len), int(d.text_len), int(d.max_segments), int(cfg.dit.in_dim)
  z = lambda shape, dtype: np.broadcast_to(np.zeros((), dtype), shape)
  # Caption ids for the jointly trained encoder; a frozen encoder's features (UMT5) otherwise.
  text = (z((b, lt), np.int32) if cfg.dit.text_encoder == "caption"
          else z((b, lt, int(cfg.dit.text_dim)), np.float32))
  return {"tokens": z((b, l, dim), np.float32), "positions": z((b, l, 3), np.int32),
          "segment_ids": z((b, l), np.int32), "loss_mask": z((b, l), np.float32),
          "text_tokens": text, "text_segment_ids": z((b, lt), np.int32),
          "seg_grid": z((b, s, 3), np.int32), "seg_fps": z((b, s), np.float32),
          "seg_is_image": z((b, s), np.int32), "seg_valid": z((b, s), np.int32)}


def compile_train_step(cfg, mesh):
  """(compiled step, Setup) of train.py's real step for this config on `mesh` (abstract inputs)."""
  setup = train.make_setup(cfg, mesh)
  step_fn = train.make_train_step(cfg, setup, train.default_loss_fn())
  return train.compile_step(step_fn, setup, abstract_batch(cfg), mesh), setup


@dataclasses.dataclass
class Cost:
  """What XLA's cost model says about one compiled step, per chip."""
  flops: float
  bytes: float
  seconds: float

  @classmethod
  def of(cls, compiled) -> "Cost":
    c = compiled.cost_analysis()
    if isinstance(c, (list, tuple)):
      c = c[0] if c else {}
    c = c or {}
    return cls(float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0)),
               float(c.get("optimal_seconds", 0.0)))

  def __add__(self, o):
    return Cost(self.flops + o.flops, self.bytes + o.bytes, self.seconds + o.seconds)

  def __sub__(self, o):
    return Cost(self.flops - o.flops, self.bytes - o.bytes, self.seconds - o.seconds)

  def __mul__(self, k: float):
    return Cost(self.flops * k, self.bytes * k, self.seconds * k)


def _with_depths(cfg, depth: int, text_depth: int):
  c = cfg.copy_and_resolve_references()
  c.dit.depth = depth
  if flops.caption_encoder(c.dit)[0]:
    c.dit.text_depth = text_depth
  return c


def shallow_costs(cfg, mesh) -> dict[int, Cost]:
  """{1: cost, 2: cost} of the step with every scan unrolled at depths (1, 1) and (2, 2) (DiT, text
  encoder), compiled in that order; their difference is one layer of each."""
  costs = {}
  for dd in (1, 2):
    with flops.unrolled_scans():
      costs[dd] = Cost.of(compile_train_step(_with_depths(cfg, dd, dd), mesh)[0])
    log.info("unrolled at depth %d: %s", dd, costs[dd])
  return costs


def step_cost(cfg, mesh, hand: flops.StepFlops, *, full_unroll: bool = False) -> tuple[Cost, dict]:
  """Cost of the whole step with every layer counted, per chip, and how it was obtained.

  The scanned step cannot be rescaled (its loop bodies count once, but work on the stacked per-layer
  arrays outside the loops, such as the optimizer, counts in full), so the step is compiled with the
  stacks unrolled at depths (1, 1) and (2, 2) (DiT, text encoder): the difference is one DiT layer plus
  one text layer, split between the two by flops.py's per-layer FLOPs (the text layer is ~1% of the
  DiT layer at pod scale; with equal depths the split does not matter), then outside + depth x layer.
  """
  depth, text_depth = int(cfg.dit.depth), flops.caption_encoder(cfg.dit)[0]
  if full_unroll:
    with flops.unrolled_scans():
      return Cost.of(compile_train_step(cfg, mesh)[0]), {"method": "fully unrolled"}
  costs = shallow_costs(cfg, mesh)
  pair = costs[2] - costs[1]
  share = hand.per_layer["dit"] / (hand.per_layer["dit"] + hand.per_layer["text"])  # 1 without text layers
  per_dit, per_text = pair * share, pair * (1 - share)
  outside = costs[1] - pair
  total = outside + per_dit * depth + per_text * text_depth
  return total, {"method": f"unrolled at depths (1,1), (2,2), extrapolated to ({depth},{text_depth})",
                 "per_layer_pair_tflops": pair.flops / 1e12, "outside_tflops": outside.flops / 1e12,
                 "dit_share_of_pair": share}


@dataclasses.dataclass
class KernelFlops:
  """Attention inside Pallas kernels, for the whole slice: flops.py's count of it, and what runs."""
  in_flops_py_total: float  # what flops.py's `total` counts for these attentions (matmuls + softmax)
  executed: float           # matmul FLOPs the kernels actually execute


def _splash_layout(cfg, lq: int, lk: int, width: int, heads: int) -> splash.Layout:
  """`splash.layout` of one attention call, with heads per device (the `tensor` mesh axis shards them)."""
  tensor = int(cfg.mesh.get("tensor", 1)) if "mesh" in cfg else 1
  local_heads = heads // tensor if tensor > 1 and heads % tensor == 0 else heads
  return splash.layout(lq, lk, local_heads, width // heads,
                       itemsize=jax.numpy.dtype(cfg.dit.get("dtype", "bfloat16")).itemsize)


def kernel_bwd_matmuls(cfg, lq: int, lk: int, width: int, heads: int) -> int:
  """Backward matmuls of one attention-kernel call: 5 where splash runs its fused kernel for these
  shapes (`splash.layout`), else 7."""
  if cfg.dit.attention != "splash":
    return KERNEL_BWD_MATMULS["separate"]
  return KERNEL_BWD_MATMULS["fused" if _splash_layout(cfg, lq, lk, width, heads).fused else "separate"]


def _padded_lengths(cfg, lq: int, lk: int, width: int, heads: int) -> tuple[int, int]:
  """(queries, keys) an attention kernel computes with, padding included."""
  if cfg.dit.attention == "gpu":
    from sora_jax.kernels import gpu  # pylint: disable=g-import-not-at-top  (imports Triton)
    return -(-lq // gpu.BLOCK) * gpu.BLOCK, -(-lk // gpu.BLOCK) * gpu.BLOCK
  lay = _splash_layout(cfg, lq, lk, width, heads)
  return lay.chunk_len * lay.chunks, lay.lk_padded


def kernel_flops(cfg, *, batch: int, seq_len: int, text_len: int, num_segments: int) -> KernelFlops:
  """Attention FLOPs of every splash call in the step (DiT self and cross, text self), dense per row."""
  d = cfg.dit
  if d.attention not in ("splash", "gpu"):
    return KernelFlops(0.0, 0.0)
  remat = flops.remat_recompute(d.remat)[1]  # flops.py's count: XLA attention recomputed or not
  calls = []  # (kind, layers, lq, lk, width, heads)
  calls.append(("self", d.depth, seq_len, seq_len, d.width, d.num_heads))
  calls.append(("cross", d.depth, seq_len, text_len, d.width, d.num_heads))
  text_depth, text_width, text_heads = flops.caption_encoder(d)
  calls.append(("self", text_depth, text_len, text_len, text_width, text_heads))
  counted = executed = 0.0
  for kind, n, lq, lk, w, h in calls:
    rerun = 0.0 if d.remat in layers.KERNEL_FORWARD_ONCE[kind] else 1.0  # what the kernels recompute
    unit = 2.0 * batch * lq * lk * w  # one of QK^T or PV, all heads
    counted += n * ((3 + remat) * 2 * unit + batch * h * lq * lk * (
        flops.SOFTMAX_FWD * (1 + remat) + flops.SOFTMAX_BWD))
    unit_pad = 2.0 * batch * math.prod(_padded_lengths(cfg, lq, lk, w, h)) * w
    executed += n * unit_pad * (KERNEL_FWD_MATMULS * (1 + rerun) + kernel_bwd_matmuls(cfg, lq, lk, w, h))
  return KernelFlops(counted, executed)


def _oom_bytes(e: Exception) -> float | None:
  """Bytes the compiler wanted, from its out-of-HBM error ("Used 105.2G of 95.7G hbm", or "memory
  required for HLO temporaries (34.43G) exceeds": temporaries only); None if `e` is another error."""
  m = (re.search(r"Used ([0-9.]+)([KMGT]) of [0-9.]+[KMGT] hbm", str(e)) or
       re.search(r"required for HLO temporaries \(([0-9.]+)([KMGT])\) exceeds", str(e)))
  if m is None:
    return float("inf") if "RESOURCE_EXHAUSTED" in str(e) else None
  return float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  parts = {k: float(getattr(m, f"{k}_size_in_bytes", 0)) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
  parts["total"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]
  return parts


def check(cfg: ml_collections.ConfigDict, topology: str, *, full_unroll: bool = False,
          kernel_efficiency: float = 0.5, num_slices: int = 1, devices: Sequence | None = None,
          skip_cost: bool = False) -> dict:
  """Compiles cfg's train step for `topology` and returns the report (see the module docstring)."""
  if not cfg.dit.in_dim:
    raise ValueError("dit.in_dim=0: pod configs must set the token dim (pt*ph*pw*latent channels)")
  devices = devices if devices is not None else topology_devices(topology, num_slices)
  mesh = sharding.mesh_from_config(cfg.mesh, devices)
  chips = len(devices)
  batch, seq_len = int(cfg.data.batch_size), int(cfg.data.seq_len)
  if batch % sharding.batch_size_multiple(mesh):
    raise ValueError(f"data.batch_size={batch} is not a multiple of data x fsdp = "
                     f"{sharding.batch_size_multiple(mesh)} on mesh {dict(mesh.shape)}")
  hbm = hbm_bytes(devices[0])
  peak = flops.published_peak(devices[0])
  t0 = time.time()
  try:
    compiled, setup = compile_train_step(cfg, mesh)
  except Exception as e:  # XLA refuses to compile a program larger than HBM
    used = _oom_bytes(e)
    if used is None:
      raise
    return {"fits": False, "memory_gb_per_chip": used / 1e9, "hbm_gb_per_chip": hbm / 1e9,
            "chips": chips, "peak_flops_per_chip": peak, "flops_per_step": float("nan"),
            "estimated_step_s": float("nan"), "estimated_mfu": float("nan"),
            "compiler_error": str(e).splitlines()[0][:300]}
  compile_s = time.time() - t0
  mem = memory(compiled)
  log.info("real step compiled in %.0fs: %.2f GB per chip of %.1f", compile_s, mem["total"] / 1e9,
           hbm / 1e9)
  hand = flops.dit_train_step_flops(cfg, batch=batch, seq_len=seq_len, text_len=int(cfg.data.text_len),
                                    num_segments=int(cfg.data.max_segments), num_params=setup.num_params)
  out = {"config_mesh": dict(mesh.shape), "remat": cfg.dit.remat, "params_b": setup.num_params / 1e9,
         "compile_s": compile_s, "memory_gb": {k: v / 1e9 for k, v in mem.items()}}
  fits = mem["total"] <= hbm
  if not skip_cost:
    t0 = time.time()
    cost, how = step_cost(cfg, mesh, hand, full_unroll=full_unroll)
    kern = kernel_flops(cfg, batch=batch, seq_len=seq_len, text_len=int(cfg.data.text_len),
                        num_segments=int(cfg.data.max_segments))
    kernel_s = kern.executed / chips / (peak * kernel_efficiency)
    xla_s, xla_time_source = cost.seconds, "compiler"
    if not xla_s > 0:  # the cost model gave no usable time: a roofline of its FLOPs and bytes instead
      bandwidth = _by_kind(HBM_BANDWIDTH, devices[0], "HBM bandwidth")
      xla_s = max(cost.flops / peak, cost.bytes / bandwidth)
      xla_time_source = f"roofline (the compiler estimated {cost.seconds:.3f} s)"
      log.warning("compiler time estimate %.3f s is unusable; using the roofline %.3f s", cost.seconds,
                  xla_s)
    step_s = xla_s + kernel_s
    xla_flops = cost.flops * chips
    agreement = xla_flops / (hand.total - kern.in_flops_py_total)
    out.update(cost_compile_s=time.time() - t0, cost_method=how, xla_tflops_per_step=xla_flops / 1e12,
               hand_total_tflops_per_step=hand.total / 1e12,
               kernel_tflops_counted=kern.in_flops_py_total / 1e12,
               kernel_tflops_executed=kern.executed / 1e12, kernel_efficiency=kernel_efficiency,
               xla_seconds=xla_s, xla_time_source=xla_time_source, kernel_seconds=kernel_s,
               xla_over_flops_py=agreement, flops_agree=abs(agreement - 1) <= FLOP_TOLERANCE,
               hbm_bytes_per_chip_accessed_gb=cost.bytes / 1e9)
  else:
    step_s = float("nan")
  out.update({
      "fits": bool(fits),
      "memory_gb_per_chip": mem["total"] / 1e9,
      "hbm_gb_per_chip": hbm / 1e9,
      "chips": chips,
      "peak_flops_per_chip": peak,
      "flops_per_step": hand.model,
      "estimated_step_s": step_s,
      "estimated_mfu": hand.model / (step_s * chips * peak) if not skip_cost else float("nan"),
  })
  return out


# ------------------------------------------------------------------------------------------- planner
REMAT_ORDER = ("none", "dots_saveable", "dots", "full_save_attention", "full_save_self_attention",
               "full")  # least recomputation first


def plan(cfg, topology: str, *, num_slices: int = 1,
         max_compiles: int = 10) -> tuple[ml_collections.ConfigDict, list]:
  """Chooses (remat, fsdp, tensor) for cfg on `topology`: the least recomputation, then the least tensor
  parallelism, whose compiled step fits in HBM; returns the chosen config and the candidates tried.

  At a fixed tensor size memory falls along REMAT_ORDER, so each tensor size (1, 2, 4, 8) is a bisection
  over the policies that would beat the best found so far (for more tensor parallelism only less
  recomputation is worth its communication): about 3 memory-only compiles for the first size, fewer
  after, and at most `max_compiles` in all (then the best found so far is kept).
  """
  devices = topology_devices(topology, num_slices)
  chips = len(devices)
  hbm = hbm_bytes(devices[0])
  tried, best = [], None  # best: (index in REMAT_ORDER, config)
  for tensor in (1, 2, 4, 8):
    if chips % tensor or cfg.dit.num_heads % tensor:
      continue
    c = cfg.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, tensor
    mesh = sharding.mesh_from_config(c.mesh, devices)
    if int(c.data.batch_size) % sharding.batch_size_multiple(mesh):
      continue
    lo, hi = 0, best[0] if best else len(REMAT_ORDER)  # the first policy in [lo, hi) that fits
    while lo < hi and len(tried) < max_compiles:
      mid = (lo + hi) // 2
      c = c.copy_and_resolve_references()
      c.dit.remat = REMAT_ORDER[mid]
      try:
        total = memory(compile_train_step(c, mesh)[0])["total"]
      except Exception as e:  # XLA refuses programs larger than HBM
        total = _oom_bytes(e)
        if total is None:
          raise
      tried.append({"remat": c.dit.remat, "fsdp": chips // tensor, "tensor": tensor, "memory_gb": total / 1e9})
      log.info("plan: remat=%s tensor=%d -> %.1f GB of %.1f", c.dit.remat, tensor, total / 1e9, hbm / 1e9)
      if total <= hbm:
        hi, best = mid, (mid, c)
      else:
        lo = mid + 1
  if best is None:
    raise ValueError(f"nothing tried fits {topology}: {tried}; lower data.batch_size or data.seq_len")
  return best[1], tried


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
  # The slice is described by libtpu's topology API, not a local backend; on a CPU machine probing for
  # a TPU backend only costs time and warnings.
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  distributed.initialize()
  cfg = config_lib.get_config().copy_and_resolve_references()
  topology = _TOPOLOGY.value or cfg.get("compile_check", {}).get("topology", "")
  if not topology:
    config_lib._fail("--topology is required (or compile_check.topology in the config)")  # pylint: disable=protected-access
  try:
    if _PLAN.value:
      cfg, tried = plan(cfg, topology, num_slices=_NUM_SLICES.value)
      print("plan: " + json.dumps(tried))
      print(f"plan: chose --config.dit.remat={cfg.dit.remat} --config.mesh.fsdp={cfg.mesh.fsdp} "
            f"--config.mesh.tensor={cfg.mesh.tensor}")
    rep = check(cfg, topology, full_unroll=_UNROLL.value, kernel_efficiency=_KERNEL_EFFICIENCY.value,
                num_slices=_NUM_SLICES.value, skip_cost=_MEMORY_ONLY.value)
  except ValueError as e:
    config_lib._fail(str(e))  # pylint: disable=protected-access
  if "compiler_error" in rep:
    print(f"{topology}: the compiler refused the step: {rep['compiler_error']}")
    print(json.dumps({k: rep[k] for k in JSON_KEYS}))
    sys.exit(1)
  gb = rep["memory_gb"]
  print(f"{topology}: {rep['chips']} chips, mesh {rep['config_mesh']}, {rep['params_b']:.2f}B params, "
        f"remat={rep['remat']}, compiled in {rep['compile_s']:.0f}s")
  print(f"memory per chip: arguments {gb['argument']:.2f} GB, outputs {gb['output']:.2f} (aliased "
        f"{gb['alias']:.2f}), temporaries {gb['temp']:.2f}, code {gb['generated_code']:.2f}; total "
        f"{gb['total']:.2f} of {rep['hbm_gb_per_chip']:.1f} GB HBM -> {'fits' if rep['fits'] else 'DOES NOT FIT'}")
  if _MEMORY_ONLY.value:
    print(json.dumps({k: rep[k] for k in JSON_KEYS}))
    sys.exit(0 if rep["fits"] else 1)
  print(f"FLOPs per step: compiler (XLA-counted, all chips) {rep['xla_tflops_per_step']:.1f} T + kernels "
        f"{rep['kernel_tflops_executed']:.1f} T executed; flops.py total {rep['hand_total_tflops_per_step']:.1f} T "
        f"(kernels' share {rep['kernel_tflops_counted']:.1f} T), model {rep['flops_per_step'] / 1e12:.1f} T; "
        f"compiler / flops.py outside kernels = {rep['xla_over_flops_py']:.3f}")
  print(f"step time: {rep['xla_time_source']} {rep['xla_seconds']:.3f}s + kernels {rep['kernel_seconds']:.3f}s at "
        f"{rep['kernel_efficiency']:.0%} of peak = {rep['estimated_step_s']:.3f}s -> MFU "
        f"{rep['estimated_mfu']:.1%} ({rep['cost_method']['method']})")
  print(json.dumps({k: rep[k] for k in JSON_KEYS}))
  if not rep["fits"]:
    sys.exit(1)
  if not rep["flops_agree"]:
    print(f"error: compiler FLOPs / flops.py = {rep['xla_over_flops_py']:.3f}, outside the "
          f"{FLOP_TOLERANCE:.0%} tolerance", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  config_lib.run(main)
