"""Compiles the real DiT train step ahead of time for a TPU slice you do not have, and says whether it
fits and how fast the compiler thinks it runs.

    python -m sora_jax.compile_check --config experiments/sora_xl.py --topology v5p:8x8x4
    python -m sora_jax.compile_check --config experiments/sora_b.py --topology v5p:4x4x4 --plan

Needs libtpu next to jax (`pip install -e '.[tpu]'`); no TPU: `get_topology_desc` describes the slice and
XLA's TPU compiler lowers, partitions and schedules the step for it on this CPU. Nothing is allocated:
the state and batch are `jax.ShapeDtypeStruct`s with their shardings (train.make_setup), and the step is
train.make_train_step compiled by train.compile_step, the same function the trainer runs.

It runs where users run it: a 2-core, 24 GB machine checks every pod preset (`make check-pods`). The
host work is XLA's TPU compiler (its low-level code generation), minutes of CPU and a few GB per
compile, almost whatever the depth and the chip count. So each compile runs in a process of its own
(`--jobs`, 2 at once by default: two cores, two programs), hands its memory back when it ends, and
leaves only its memory and cost figures behind; a line is logged per phase (tracing, lowering,
compiling, memory, cost) with the host memory in use, and the check stops with a one-line error (exit
status 4) rather than being killed when the machine's memory runs out.

The estimate, and what makes it honest (docs/pods.md has the long form):
- Memory per chip is `memory_analysis()` of the real step (layers scanned, as trained): arguments +
  outputs - donated aliases + temporaries + code, against the chip's HBM. XLA itself refuses to compile a
  program larger than HBM, so "fits" is also the compiler's verdict.
- `cost_analysis()` counts a `lax.scan` body once, not once per layer, while work on the stacked
  per-layer arrays outside the loop counts in full, so the scanned count cannot be rescaled. The step is
  compiled again with the layer stacks unrolled at depths (1, 1) and (2, 2) (DiT, text encoder); the
  difference is one layer of each (split by flops.py's per-layer ratio), and FLOPs, bytes and the
  compiler's time are extrapolated to the real depths (identical layers: cost is affine in depth).
  `--cost` picks another way (step_cost): `unrolled` compiles the full-depth unrolled step (slow; a
  check of the extrapolation), `scanned` adds depth - 1 layers to the real step's own count from one
  compile with two layers per loop trip (it prices the loop as the trainer runs it, which the cost model
  puts higher: 40.8% against 44.3% for sora_b before `52fe3f4`, against 42.4% since), and `one` prices
  the missing layers from the real step alone (approximate; for a step that takes most of the time
  limit to compile once).
- Pallas kernels (splash attention) are custom calls the cost model does not see (it reports no FLOPs
  for them). flops.kernel_flops counts their FLOPs by hand from the kernel's algorithm (forward 2
  matmuls; backward 5 in splash's fused kernel (whole or over query chunks), or 7 in separate dkv and dq
  kernels, per call as `splash.layout` decides from the call's shapes, always 7 for the GPU kernels; the
  forward again under a remat policy that does not save the kernel's residuals), for rows holding one segment
  each (the densest packing, where splash skips no block), and their time is those FLOPs at
  `--kernel_efficiency` of peak. Ring and all-to-all attention (context parallelism, `dit.context`) run
  their local kernels (and the ring its hops) as loops whose bodies the cost model counts once: they are
  counted the same way.
- The compiler's FLOPs (XLA-counted part, times chips) must agree with flops.py's count of the same
  work (flops.py's total minus the kernels' share) within 10%; the run fails otherwise.
- MFU = flops.py's model FLOPs (no remat, dense attention = one segment per row) / (step time x chips x
  peak): remat and the kernel's extra backward matmuls cost time but are not counted as useful work.

The last line printed is one JSON object (keys in JSON_KEYS); the exit status is 1 when the step does
not fit in HBM, 2 on bad input, 3 when the FLOP check fails, 4 when the host runs out of memory.
`check()` returns the report as a dict.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import gc
import json
import logging
import math
import multiprocessing
import os
import re
import resource
import signal
import sys
import threading
import time
from typing import Sequence

from absl import flags
import jax
import ml_collections
import numpy as np

from sora_jax import config as config_lib
from sora_jax import distributed, flops, sharding, train
from sora_jax.models import layers

# How the cost of the whole step is counted (module docstring), cheapest exact one first.
COST_METHODS = ("shallow", "scanned", "unrolled", "one")

_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice, e.g. v5p:8x8x4 or v6e:16x16; "
                                "default: the config's compile_check.topology")
_PLAN = flags.DEFINE_bool("plan", False, "choose remat policy and FSDP/TP sizes that fit, then check")
_COST = flags.DEFINE_enum("cost", None, COST_METHODS, "how the step's cost is counted (module docstring): "
                          "shallow (3 compiles), scanned (2), unrolled (full depth, slow), one (1 compile, "
                          "approximate); default: the config's compile_check.cost, else shallow")
_JOBS = flags.DEFINE_integer("jobs", 2, "compiles run at once, each in its own process (about 3 GB each "
                             "for sora_xl); 1: one after another in this process")
_KERNEL_EFFICIENCY = flags.DEFINE_float("kernel_efficiency", 0.5, "fraction of peak assumed for Pallas "
                                        "attention kernels, whose cost XLA's model does not see")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (multi-slice)")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "compile the real step once: memory and fit "
                                 "only, no cost estimate")
_MAX_HOST_GB = flags.DEFINE_float("max_host_gb", 0.0, "stop with an error when this process's host memory "
                                  "passes this many GB; 0: what the machine has available at the start")

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
             "flops_per_step", "estimated_step_s", "estimated_mfu", "host_peak_gb", "wall_s")


# ---------------------------------------------------------------------------- progress and host memory
# The host work is XLA's TPU compiler: minutes of CPU and gigabytes of its own memory per compile
# (docs/benchmarks.md, "Pod compile checks": wall clock and peak host memory per preset). A compile
# that outgrows the machine is otherwise ended by the kernel's OOM killer without a word, or takes a
# neighbouring process with it.
EXIT_HOST_MEMORY = 4
HOST_RESERVE_BYTES = 1e9     # left to the rest of the machine: below this much available, stop
HOST_MIN_START_BYTES = 3e9   # the smallest pod check here peaks near 3 GB: below this, do not start

_START_TIME = [time.time()]  # when the check started, for the log lines' seconds
_phase = ["starting"]        # what the process is doing, for the guard's error line
_peak = [0.0]                # the most memory this process and its compile processes held together


def _proc_rss(pid: int | str) -> float:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return float(line.split()[1]) * 1024
  return 0.0


def _descendants(pid: int) -> list[int]:
  """The processes started by `pid` and by them (Linux /proc), e.g. compile_all's compile processes."""
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    try:
      for task in os.listdir(f"/proc/{p}/task"):
        with open(f"/proc/{p}/task/{task}/children") as f:
          kids = [int(k) for k in f.read().split()]
        out += kids
        todo += kids
    except OSError:
      continue
  return out


def host_rss() -> float:
  """Resident memory of this process and its compile processes, in bytes (this process's peak so far
  where /proc does not exist)."""
  try:
    total = _proc_rss("self")
  except OSError:
    return host_peak()
  for pid in _descendants(os.getpid()):
    try:
      total += _proc_rss(pid)
    except OSError:  # ended meanwhile
      pass
  _peak[0] = max(_peak[0], total)
  return total


def host_peak() -> float:
  """The most resident memory this check has held, in bytes: the guard's samples of this process and its
  compile processes together, and at least the largest single process (getrusage)."""
  scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
  single = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return max(_peak[0], float(single) * scale)


def host_available() -> float | None:
  """Bytes the machine can still give (MemAvailable), or None where /proc/meminfo does not exist."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def progress(msg: str) -> None:
  """One log line: seconds since start, host memory in use, and what starts now."""
  _phase[0] = msg
  log.info("[%5.0fs, host %4.1f GB] %s", time.time() - _START_TIME[0], host_rss() / 1e9, msg)


def _on_scalar(event: str, value: float, **kwargs) -> None:
  """jax.monitoring records each phase's start time as a scalar: log the train step's phases."""
  del value
  if "train_step" not in str(kwargs.get("fun_name", "")):
    return
  if event.endswith("jaxpr_trace_duration"):
    progress("tracing the train step")
  elif event.endswith("jaxpr_to_mlir_module_duration"):
    progress("lowering it to StableHLO")
  elif event.endswith("backend_compile_duration"):
    progress("compiling it for the TPU slice (XLA's TPU compiler: the long part)")


def _on_duration(event: str, duration: float, **kwargs) -> None:
  if "train_step" in str(kwargs.get("fun_name", "")) and event.endswith("backend_compile_duration"):
    progress(f"compiled in {duration:.0f}s")


def log_phases() -> None:
  """Logs the start of tracing, lowering and compiling of every train step compiled from now on."""
  jax.monitoring.register_scalar_listener(_on_scalar)
  jax.monitoring.register_event_duration_secs_listener(_on_duration)


def guard_host_memory(limit: float = 0.0, *, interval_s: float = 0.25) -> float:
  """Starts a thread that ends the check, its compile processes included, with one line on stderr and
  exit status EXIT_HOST_MEMORY when their resident memory passes `limit` bytes, or the machine's
  available memory falls below HOST_RESERVE_BYTES (another process grew). `limit` 0: what this process
  holds now plus what the machine has available, less the reserve. Returns the limit."""
  available = host_available()
  if not limit:
    limit = host_rss() + available - HOST_RESERVE_BYTES if available is not None else math.inf

  def watch():
    while True:
      rss, left = host_rss(), host_available()
      if rss > limit or (left is not None and left < HOST_RESERVE_BYTES):
        for pid in _descendants(os.getpid()):
          try:
            os.kill(pid, signal.SIGKILL)
          except OSError:
            pass
        left_s = f"{left / 1e9:.1f} GB" if left is not None else "unknown"
        sys.stderr.write(
            f"error: host memory: compile_check holds {rss / 1e9:.1f} GB (limit {limit / 1e9:.1f} GB) "
            f"and the machine has {left_s} left, while {_phase[0]}; stopped before the system runs out. "
            "Close other programs, run on a machine with more memory, or check less at once "
            "(--jobs=1 compiles one program at a time; --memory_only the real step only)\n")
        sys.stderr.flush()
        os._exit(EXIT_HOST_MEMORY)
      time.sleep(interval_s)

  threading.Thread(target=watch, name="host-memory-guard", daemon=True).start()
  return limit


def release_host_memory() -> None:
  """Hands what the last compile freed back to the system: the executable and the tracing caches go
  with the references to them, and glibc's heaps keep freed memory (RSS stays up) until trimmed."""
  gc.collect()
  jax.clear_caches()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


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


@dataclasses.dataclass
class Compiled:
  """What the report needs from one compile, kept instead of the executable, which holds gigabytes of
  host memory until freed. `refused`: the compiler's out-of-HBM error, where it refused the program."""
  memory: dict
  cost: Cost
  num_params: int
  compile_s: float
  refused: str = ""


@dataclasses.dataclass
class Compile:
  """One compile of cfg's step: `per_trip` None keeps the scans as trained, 0 unrolls them, k puts k
  layers in each loop trip (flops.unrolled_scans). `label` names it in the log, `tag` the log lines
  of its process."""
  label: str
  cfg: ml_collections.ConfigDict
  per_trip: int | None = None
  tag: str = "compile"


def compile_and_release(cfg, mesh, what: str, *, per_trip: int | None = None) -> Compiled:
  """Compiles cfg's step (see Compile), reads its memory and cost, and frees it before returning; the
  compiler's refusal of a program larger than HBM comes back as `refused`, other errors are raised."""
  progress(f"{what}: starting")
  t0 = time.time()
  try:
    if per_trip is None:
      compiled, setup = compile_train_step(cfg, mesh)
    else:
      with flops.unrolled_scans(per_trip):
        compiled, setup = compile_train_step(cfg, mesh)
  except Exception as e:  # pylint: disable=broad-except
    if _oom_bytes(e) is None:
      raise
    release_host_memory()
    progress(f"{what}: the compiler refused it after {time.time() - t0:.0f}s (larger than HBM)")
    return Compiled({}, Cost(0.0, 0.0, 0.0), 0, time.time() - t0, refused=str(e))
  out = Compiled(memory(compiled), Cost.of(compiled), setup.num_params, time.time() - t0)
  del compiled
  release_host_memory()
  progress(f"{what}: done in {out.compile_s:.0f}s, {out.cost}")
  return out


def _compile_in_child(job: Compile, topology: str, num_slices: int, start: float) -> Compiled:
  """One compile in a spawned process: its own jax on the CPU platform and the slice's devices; its log
  lines count seconds from `start`, the check's. Errors come back as ValueError or RuntimeError with
  the message (not every jaxlib exception pickles)."""
  _START_TIME[0] = start
  jax.config.update("jax_platforms", "cpu")
  logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{job.tag}] %(message)s",
                      stream=sys.stdout, force=True)
  log.setLevel(logging.INFO)
  log_phases()
  try:
    mesh = sharding.mesh_from_config(job.cfg.mesh, topology_devices(topology, num_slices))
    return compile_and_release(job.cfg, mesh, job.label, per_trip=job.per_trip)
  except ValueError as e:
    raise ValueError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"{type(e).__name__}: {e}") from None


def compile_all(jobs: list[Compile], mesh, *, topology: str = "", num_slices: int = 1,
                processes: int = 1) -> list[Compiled]:
  """Compiles `jobs` in order: in this process one after another, or (`processes` > 1, `topology` given)
  in up to that many spawned processes at once, each a fresh process per compile, so a compile's
  memory goes back to the system when it ends and two cores compile two programs. XLA's TPU compiler
  works on one program at a time; most of a check's wall clock is its compiles."""
  if processes <= 1 or len(jobs) == 1 or not topology:
    return [compile_and_release(j.cfg, mesh, j.label, per_trip=j.per_trip) for j in jobs]
  progress(f"compiling {len(jobs)} programs, {min(processes, len(jobs))} processes at a time: "
           + "; ".join(j.label for j in jobs))
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=min(processes, len(jobs)), mp_context=ctx,
                                              max_tasks_per_child=1) as pool:
    futures = [pool.submit(_compile_in_child, j, topology, num_slices, _START_TIME[0]) for j in jobs]
    return [f.result() for f in futures]


def _with_depths(cfg, depth: int, text_depth: int):
  c = cfg.copy_and_resolve_references()
  c.dit.depth = depth
  if flops.caption_encoder(c.dit)[0]:
    c.dit.text_depth = text_depth
  return c


def cost_jobs(cfg, method: str) -> dict:
  """The compiles cost `method` needs besides the real step, by key (see step_cost)."""
  if method not in COST_METHODS:
    raise ValueError(f"cost method {method!r} is unknown; accepted: {COST_METHODS}")
  if method == "unrolled":
    return {"full": Compile("cost: the full-depth step unrolled", cfg, 0, tag="cost, unrolled")}
  if method == "shallow":
    return {dd: Compile(f"cost: the step unrolled at depths ({dd}, {dd})", _with_depths(cfg, dd, dd), 0,
                        tag=f"cost, depth {dd}") for dd in (1, 2)}
  if method == "scanned" and _extra_layers(cfg)[1]:
    trips = _extra_layers(cfg)[0]
    return {"trip": Compile(f"cost: the step with {trips['dit']} layers per loop trip", cfg, 2,
                            tag="cost, 2 per trip")}
  return {}


def _extra_layers(cfg) -> tuple[dict, dict]:
  """({stack: layers per loop trip}, {stack: layers more than the scanned step counts}) of the compile
  with two layers per loop trip; stacks "dit" and "text"."""
  depths = {"dit": int(cfg.dit.depth), "text": flops.caption_encoder(cfg.dit)[0]}
  trips = {k: flops.iterations_per_trip(n, 2) for k, n in depths.items()}
  return trips, {k: t - 1 for k, t in trips.items() if t > 1}


def shallow_costs(cfg, mesh) -> dict[int, Cost]:
  """{1: cost, 2: cost} of the step with every scan unrolled at depths (1, 1) and (2, 2) (DiT, text
  encoder), compiled in that order; their difference is one layer of each."""
  return {k: compile_and_release(j.cfg, mesh, j.label, per_trip=j.per_trip).cost
          for k, j in cost_jobs(cfg, "shallow").items()}


def _split_layers(pair: Cost, hand: flops.StepFlops, extra: dict) -> tuple[Cost, Cost]:
  """(one DiT layer, one text layer) from `pair`, the cost of `extra[k]` more layers of each stack k
  ("dit", "text"), split in proportion to flops.py's per-layer FLOPs (with one stack, all of it)."""
  w = {k: extra.get(k, 0) * hand.per_layer[k] for k in ("dit", "text")}
  total = w["dit"] + w["text"]
  return tuple(pair * (w[k] / total / extra[k]) if w[k] else Cost(0.0, 0.0, 0.0) for k in ("dit", "text"))


def _kernel_counted_per_layer(cfg, key: str) -> float:
  """flops.py's FLOPs (whole slice) for the attention inside kernels of one layer of stack `key`."""
  depths = (1, 0) if key == "dit" else (0, 1)
  d = cfg.data
  kern = flops.kernel_flops(_with_depths(cfg, *depths), batch=int(d.batch_size), seq_len=int(d.seq_len),
                            text_len=int(d.text_len), num_segments=int(d.max_segments))
  return kern.in_flops_py_total


def combine_costs(cfg, hand: flops.StepFlops, method: str, scanned: Cost | None, costs: dict,
                  chips: int) -> tuple[Cost, dict]:
  """The whole step's cost per chip from the compiles of `cost_jobs(cfg, method)` (`costs`, by key) and
  the real step's own (`scanned`), and how it was obtained (see step_cost)."""
  depth, text_depth = int(cfg.dit.depth), flops.caption_encoder(cfg.dit)[0]
  if method == "unrolled":
    return costs["full"], {"method": "fully unrolled"}
  if method == "shallow":
    pair = costs[2] - costs[1]
    per_dit, per_text = _split_layers(pair, hand, {"dit": 1, "text": 1})
    outside = costs[1] - pair
    total = outside + per_dit * depth + per_text * text_depth
    return total, {"method": f"unrolled at depths (1,1), (2,2), extrapolated to ({depth},{text_depth})",
                   "per_layer_pair_tflops": pair.flops / 1e12, "outside_tflops": outside.flops / 1e12}
  if scanned is None:
    raise ValueError(f"cost method {method!r} needs the scanned step's cost (check() passes it)")
  if method == "one":
    per_flop = Cost(1.0, scanned.bytes / scanned.flops, scanned.seconds / scanned.flops)
    per = {k: per_flop * ((hand.per_layer[k] - _kernel_counted_per_layer(cfg, k)) / chips) if n
           else Cost(0.0, 0.0, 0.0) for k, n in (("dit", depth), ("text", text_depth))}
    total = scanned + per["dit"] * (depth - 1) + per["text"] * max(text_depth - 1, 0)
    return total, {"method": "the scanned step, with its depth - 1 uncounted layers at flops.py's FLOPs "
                             "and the counted work's bytes and seconds per FLOP (approximate)",
                   "scanned_tflops": scanned.flops / 1e12}
  trips, extra = _extra_layers(cfg)
  if not extra:  # every stack is one layer deep: the scanned count is complete
    return scanned, {"method": "scanned (every stack one layer deep)"}
  per_dit, per_text = _split_layers(costs["trip"] - scanned, hand, extra)
  total = scanned + per_dit * (depth - 1) + per_text * max(text_depth - 1, 0)
  return total, {"method": f"scanned, plus (depth - 1) x one layer ({trips['dit']} and {trips['text']} "
                           f"layers per loop trip, against 1), to ({depth},{text_depth})",
                 "per_dit_layer_tflops": per_dit.flops / 1e12, "scanned_tflops": scanned.flops / 1e12}


def step_cost(cfg, mesh, hand: flops.StepFlops, *, method: str = "shallow",
              scanned: Cost | None = None) -> tuple[Cost, dict]:
  """Cost of the whole step with every layer counted, per chip, and how it was obtained; the compiles
  run here, one after another.

  "shallow" (check()'s default) compiles the step unrolled at depths (1, 1) and (2, 2) and extrapolates:
  the difference is one layer of each stack (identical layers make the cost affine in depth), split
  between the DiT and the text encoder by flops.py's per-layer FLOPs. "unrolled" compiles the
  full-depth step unrolled. `scanned`, the real (scanned) step's own cost, counts the work outside the
  loops in full (the optimizer over the stacked layers included) and each loop body once, so exactly
  depth - 1 layers of each stack are missing: "scanned" compiles the step once more with two layers per
  loop trip (three for an odd depth, ...), and adds depth - 1 times the difference; it prices the loop
  the trainer runs, whose per-layer traffic the cost model puts higher than the unrolled layers'
  (docs/benchmarks.md). "one" prices the missing layers at flops.py's FLOPs outside the kernels per
  layer, with the counted work's bytes and seconds per FLOP (approximate; no compile beyond the real one).
  """
  jobs = cost_jobs(cfg, method)
  costs = {k: compile_and_release(j.cfg, mesh, j.label, per_trip=j.per_trip).cost for k, j in jobs.items()}
  chips = mesh.devices.size if method == "one" else 0
  return combine_costs(cfg, hand, method, scanned, costs, chips)


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


def check(cfg: ml_collections.ConfigDict, topology: str, *, cost: str = "shallow",
          kernel_efficiency: float = 0.5, num_slices: int = 1, devices: Sequence | None = None,
          skip_cost: bool = False, real: Compiled | None = None, processes: int = 1) -> dict:
  """Compiles cfg's train step for `topology` and returns the report (see the module docstring).

  `cost`: how the step's cost is counted (COST_METHODS, step_cost). `real`: the real step's compile when
  the caller has it already (the planner's chosen candidate), not compiled again. `processes`: compiles
  run at once, each in its own process (compile_all); 1: here, one after another.
  """
  if not cfg.dit.in_dim:
    raise ValueError("dit.in_dim=0: pod configs must set the token dim (pt*ph*pw*latent channels)")
  if cost not in COST_METHODS:
    raise ValueError(f"cost={cost!r} is unknown; accepted: {COST_METHODS}")
  devices = devices if devices is not None else topology_devices(topology, num_slices)
  mesh = sharding.mesh_from_config(cfg.mesh, devices)
  chips = len(devices)
  batch, seq_len = int(cfg.data.batch_size), int(cfg.data.seq_len)
  if batch % sharding.batch_size_multiple(mesh):
    raise ValueError(f"data.batch_size={batch} is not a multiple of data x fsdp = "
                     f"{sharding.batch_size_multiple(mesh)} on mesh {dict(mesh.shape)}")
  hbm = hbm_bytes(devices[0])
  peak = flops.published_peak(devices[0])
  t_start = time.time()
  host = lambda: {"host_peak_gb": host_peak() / 1e9, "wall_s": time.time() - t_start}
  jobs = [] if real is not None else [Compile(f"memory: the real step (layers scanned), {chips} chips, "
                                              f"mesh {dict(mesh.shape)}", cfg, tag="memory")]
  extra = cost_jobs(cfg, cost) if not skip_cost else {}
  done = compile_all(jobs + list(extra.values()), mesh, topology=topology, num_slices=num_slices,
                     processes=processes)
  real = real or done[0]
  costs = dict(zip(extra, done[len(jobs):]))
  if real.refused:  # XLA refuses to compile a program larger than HBM
    return {"fits": False, "memory_gb_per_chip": _oom_bytes(RuntimeError(real.refused)) / 1e9,
            "hbm_gb_per_chip": hbm / 1e9, "chips": chips, "peak_flops_per_chip": peak,
            "flops_per_step": float("nan"), "estimated_step_s": float("nan"),
            "estimated_mfu": float("nan"), "compiler_error": real.refused.splitlines()[0][:300], **host()}
  for k, c in costs.items():
    if c.refused:
      raise ValueError(f"{extra[k].label}: the compiler refused it ({c.refused.splitlines()[0][:200]}); "
                       "count the cost another way (--cost=scanned or --cost=one)")
  mem = real.memory
  fits = mem["total"] <= hbm
  progress(f"memory: {mem['total'] / 1e9:.2f} GB per chip of {hbm / 1e9:.1f} "
           f"({'fits' if fits else 'does not fit'})")
  hand = flops.dit_train_step_flops(cfg, batch=batch, seq_len=seq_len, text_len=int(cfg.data.text_len),
                                    num_segments=int(cfg.data.max_segments), num_params=real.num_params)
  out = {"config_mesh": dict(mesh.shape), "remat": cfg.dit.remat, "params_b": real.num_params / 1e9,
         "compile_s": real.compile_s, "memory_gb": {k: v / 1e9 for k, v in mem.items()}}
  if not skip_cost:
    step, how = combine_costs(cfg, hand, cost, real.cost, {k: c.cost for k, c in costs.items()}, chips)
    kern = flops.kernel_flops(cfg, batch=batch, seq_len=seq_len, text_len=int(cfg.data.text_len),
                              num_segments=int(cfg.data.max_segments))
    kernel_s = kern.executed / chips / (peak * kernel_efficiency)
    xla_s, xla_time_source = step.seconds, "compiler"
    if not xla_s > 0:  # the cost model gave no usable time: a roofline of its FLOPs and bytes instead
      bandwidth = _by_kind(HBM_BANDWIDTH, devices[0], "HBM bandwidth")
      xla_s = max(step.flops / peak, step.bytes / bandwidth)
      xla_time_source = f"roofline (the compiler estimated {step.seconds:.3f} s)"
      log.warning("compiler time estimate %.3f s is unusable; using the roofline %.3f s", step.seconds,
                  xla_s)
    step_s = xla_s + kernel_s
    xla_flops = step.flops * chips
    agreement = xla_flops / (hand.total - kern.in_flops_py_total)
    out.update(cost_compile_s=sum(c.compile_s for c in costs.values()), cost_method=how,
               xla_tflops_per_step=xla_flops / 1e12,
               hand_total_tflops_per_step=hand.total / 1e12,
               kernel_tflops_counted=kern.in_flops_py_total / 1e12,
               kernel_tflops_executed=kern.executed / 1e12, kernel_efficiency=kernel_efficiency,
               xla_seconds=xla_s, xla_time_source=xla_time_source, kernel_seconds=kernel_s,
               xla_over_flops_py=agreement, flops_agree=abs(agreement - 1) <= FLOP_TOLERANCE,
               hbm_bytes_per_chip_accessed_gb=step.bytes / 1e9)
    progress(f"cost: {step_s:.3f} s per step, MFU {hand.model / (step_s * chips * peak):.1%}")
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
      **host(),
  })
  return out


# ------------------------------------------------------------------------------------------- planner
REMAT_ORDER = tuple(layers.REMAT)  # least recomputation first: the table's order


def plan(cfg, topology: str, *, num_slices: int = 1,
         max_compiles: int = 10) -> tuple[ml_collections.ConfigDict, list, Compiled]:
  """Chooses (remat, fsdp, tensor) for cfg on `topology`: the least recomputation, then the least tensor
  parallelism, whose compiled step fits in HBM; returns the chosen config, the candidates tried, and the
  chosen candidate's compile (check() reuses it instead of compiling the real step again).

  At a fixed tensor size memory falls along REMAT_ORDER, so each tensor size (1, 2, 4, 8) is a bisection
  over the policies that would beat the best found so far (for more tensor parallelism only less
  recomputation is worth its communication): about 3 memory-only compiles for the first size, fewer
  after, and at most `max_compiles` in all (then the best found so far is kept).
  """
  devices = topology_devices(topology, num_slices)
  chips = len(devices)
  hbm = hbm_bytes(devices[0])
  tried, best = [], None  # best: (index in REMAT_ORDER, config, compile)
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
      compiled = None
      try:
        compiled = compile_and_release(c, mesh, f"plan: remat={c.dit.remat} tensor={tensor}")
        total = compiled.memory["total"]
      except Exception as e:  # XLA refuses programs larger than HBM
        total = _oom_bytes(e)
        if total is None:
          raise
        release_host_memory()
      tried.append({"remat": c.dit.remat, "fsdp": chips // tensor, "tensor": tensor, "memory_gb": total / 1e9})
      progress(f"plan: remat={c.dit.remat} tensor={tensor} -> {total / 1e9:.1f} GB of {hbm / 1e9:.1f}")
      if total <= hbm:
        hi, best = mid, (mid, c, compiled)
      else:
        lo = mid + 1
  if best is None:
    raise ValueError(f"nothing tried fits {topology}: {tried}; lower data.batch_size or data.seq_len")
  return best[1], tried, best[2]


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
  # The slice is described by libtpu's topology API, not a local backend; on a CPU machine probing for
  # a TPU backend only costs time and warnings.
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  distributed.initialize()
  cfg = config_lib.get_config().copy_and_resolve_references()
  section = cfg.compile_check if "compile_check" in cfg else None
  topology = _TOPOLOGY.value or (section.topology if section else "")
  if not topology:
    config_lib._fail("--topology is required (or compile_check.topology in the config)")  # pylint: disable=protected-access
  cost = _COST.value or (section.cost if section else config_lib.OPTIONAL_KEYS["compile_check"]["cost"])
  available = host_available()
  if available is not None and available < HOST_MIN_START_BYTES:
    print(f"error: host memory: {available / 1e9:.1f} GB available, and a pod check needs about "
          f"{HOST_MIN_START_BYTES / 1e9:.0f} GB or more (docs/benchmarks.md); close other programs or "
          "use a machine with more memory", file=sys.stderr)
    sys.exit(EXIT_HOST_MEMORY)
  limit = guard_host_memory(_MAX_HOST_GB.value * 1e9)
  log_phases()
  progress(f"checking {topology}; this process stops at {limit / 1e9:.1f} GB of host memory")
  real = None
  try:
    if _PLAN.value:
      cfg, tried, real = plan(cfg, topology, num_slices=_NUM_SLICES.value)
      print("plan: " + json.dumps(tried))
      print(f"plan: chose --config.dit.remat={cfg.dit.remat} --config.mesh.fsdp={cfg.mesh.fsdp} "
            f"--config.mesh.tensor={cfg.mesh.tensor}")
    rep = check(cfg, topology, cost=cost, kernel_efficiency=_KERNEL_EFFICIENCY.value,
                num_slices=_NUM_SLICES.value, skip_cost=_MEMORY_ONLY.value, real=real,
                processes=_JOBS.value)
  except ValueError as e:
    config_lib._fail(str(e))  # pylint: disable=protected-access
  if "compiler_error" in rep:
    print(f"{topology}: the compiler refused the step: {rep['compiler_error']}")
    print(json.dumps({k: rep[k] for k in JSON_KEYS}))
    sys.exit(1)
  gb = rep["memory_gb"]
  print(f"{topology}: {rep['chips']} chips, mesh {rep['config_mesh']}, {rep['params_b']:.2f}B params, "
        f"remat={rep['remat']}, real step compiled in {rep['compile_s']:.0f}s")
  print(f"memory per chip: arguments {gb['argument']:.2f} GB, outputs {gb['output']:.2f} (aliased "
        f"{gb['alias']:.2f}), temporaries {gb['temp']:.2f}, code {gb['generated_code']:.2f}; total "
        f"{gb['total']:.2f} of {rep['hbm_gb_per_chip']:.1f} GB HBM -> {'fits' if rep['fits'] else 'DOES NOT FIT'}")
  cpu_s = sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  host = (f"host: peak {rep['host_peak_gb']:.2f} GB resident, {rep['wall_s']:.0f}s of wall clock, "
          f"{cpu_s:.0f}s of CPU (compile processes included)")
  if _MEMORY_ONLY.value:
    print(host)
    print(json.dumps({k: rep[k] for k in JSON_KEYS}))
    sys.exit(0 if rep["fits"] else 1)
  print(f"FLOPs per step: compiler (XLA-counted, all chips) {rep['xla_tflops_per_step']:.1f} T + kernels "
        f"{rep['kernel_tflops_executed']:.1f} T executed; flops.py total {rep['hand_total_tflops_per_step']:.1f} T "
        f"(kernels' share {rep['kernel_tflops_counted']:.1f} T), model {rep['flops_per_step'] / 1e12:.1f} T; "
        f"compiler / flops.py outside kernels = {rep['xla_over_flops_py']:.3f}")
  print(f"step time: {rep['xla_time_source']} {rep['xla_seconds']:.3f}s + kernels {rep['kernel_seconds']:.3f}s at "
        f"{rep['kernel_efficiency']:.0%} of peak = {rep['estimated_step_s']:.3f}s -> MFU "
        f"{rep['estimated_mfu']:.1%} ({rep['cost_method']['method']})")
  print(host)
  print(json.dumps({k: rep[k] for k in JSON_KEYS}))
  if not rep["fits"]:
    sys.exit(1)
  if not rep["flops_agree"]:
    print(f"error: compiler FLOPs / flops.py = {rep['xla_over_flops_py']:.3f}, outside the "
          f"{FLOP_TOLERANCE:.0%} tolerance", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  config_lib.run(main)
