"""Multi-host start-up for every entry point: `jax.distributed.initialize` when the job spans hosts, and
logs from process 0 only.

    from sora_jax import distributed
    def main(argv):
      distributed.initialize()      # first thing, before anything touches jax devices
      ...

Where the process group comes from, first match wins:
1. flags `--coordinator=host:port --num_processes=N --process_id=i` (any launcher; localhost tests);
2. the environment `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (same meaning);
3. SLURM (`SLURM_JOB_ID` with `SLURM_NTASKS` > 1, one task per host or per GPU): jax reads srun's
   variables itself;
4. a TPU VM or GKE TPU pod (`/dev/accel*` or `/dev/vfio/*` present, or `TPU_WORKER_HOSTNAMES`,
   `MEGASCALE_COORDINATOR_ADDRESS` set): jax asks the TPU metadata for the workers;
otherwise one process, and nothing is done. `--distributed=off` forces one process, `on` forces the
auto-detecting `jax.distributed.initialize()`.

CPU processes (tests, this machine) exchange collectives over gloo (FACTS.md).
"""
from __future__ import annotations

import glob
import logging
import os

from absl import flags
from etils import epath
import jax
import numpy as np

_MODE = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                          "multi-host start-up: auto-detect, force jax.distributed.initialize(), or none")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0's coordinator service")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1")

log = logging.getLogger("sora_jax.distributed")

_initialized = False


def _flag(f):
  return f.value if flags.FLAGS.is_parsed() else None


def detect(environ=None) -> tuple[str, dict]:
  """(source, keyword arguments for jax.distributed.initialize); source "" means one process."""
  env = os.environ if environ is None else environ
  explicit = {"coordinator_address": _flag(_COORDINATOR), "num_processes": _flag(_NUM_PROCESSES),
              "process_id": _flag(_PROCESS_ID)}
  if any(v is not None for v in explicit.values()):
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      raise ValueError(f"--coordinator, --num_processes and --process_id go together; missing {missing}")
    return "flags", explicit
  if env.get("JAX_COORDINATOR_ADDRESS"):
    try:
      return "environment", {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                             "num_processes": int(env["JAX_NUM_PROCESSES"]),
                             "process_id": int(env["JAX_PROCESS_ID"])}
    except (KeyError, ValueError):
      raise ValueError("JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                       "integers too") from None
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm", {}
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu", {}
  if environ is None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
    return "tpu", {}  # a TPU VM: jax reads the worker list from the metadata server
  return "", {}


def initialize() -> int:
  """Joins the job's process group when there is one; returns jax.process_count(). Idempotent."""
  global _initialized
  mode = _flag(_MODE) or "auto"
  if _initialized or mode == "off":
    return jax.process_count() if _initialized else 1
  source, kwargs = ("forced", {}) if mode == "on" else detect()
  if not source:
    return 1
  # CPU collectives across processes need an implementation; gloo ships with jaxlib (FACTS.md).
  # Harmless for TPU and GPU processes, whose collectives do not use it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  _initialized = True
  quiet_other_processes()
  log.info("distributed (%s): process %d of %d, %d local / %d global devices", source,
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count()


def quiet_other_processes() -> None:
  """Processes other than 0 keep warnings and errors only (every process would print the same)."""
  if jax.process_index() != 0:
    logging.disable(logging.INFO)  # absl logs through Python logging too


def is_main() -> bool:
  """True on the process that logs, writes metrics and prints results."""
  return jax.process_index() == 0


# ------------------------------------------------------------------------- changing the process count
# The global batch of a step is the concatenation of the processes' host-local batches in process order
# (pipeline.to_global places process p's rows before process p + 1's). A job restarted on M processes
# can therefore continue the exact stream of a job of N processes (M divides N): process j reads the N/M
# consecutive shards j*N/M, ... of the N-process stream and concatenates them.

class MergedShards:
  """Host-local batches of several stream shards, concatenated in shard order; checkpointable.

  `iterators` are the shards' iterators (grain DatasetIterators, whose states are JSON-able dicts);
  the state is {"shards": [state, ...]}, so the checkpoint's data position is all of them.
  """

  def __init__(self, iterators: list):
    self.iterators = list(iterators)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batches = [next(it) for it in self.iterators]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict:
    return {"shards": [it.get_state() for it in self.iterators]}

  def set_state(self, state: dict) -> None:
    shards = state.get("shards") if isinstance(state, dict) else None
    if shards is None or len(shards) != len(self.iterators):
      raise ValueError(f"data position holds {len(shards) if shards else 'no'} shards; this process "
                       f"reads {len(self.iterators)} (reshard the checkpoint with reshard_data_position)")
    for it, s in zip(self.iterators, shards):
      it.set_state(s)


def data_iterator(cfg, *, stream_processes: int | None = None, split: str = "train", **kwargs):
  """This process's iterator of the packed stream as a job of `stream_processes` processes reads it.

  None or jax.process_count(): the pipeline's own per-process iterator. A multiple of the process count
  (a job resumed on fewer hosts): the consecutive shards of the larger job, merged.
  """
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pc, pi = jax.process_count(), jax.process_index()
  n = stream_processes or pc
  if n == pc:
    return pipeline.make_iterator(cfg, split=split, **kwargs)
  if n % pc:
    raise ValueError(f"stream_processes={n} is not a multiple of the {pc} processes of this job")
  k = n // pc
  return MergedShards([pipeline.make_iterator(cfg, split=split, process_index=pi * k + i,
                                              process_count=n, **kwargs) for i in range(k)])


def reshard_data_position(step_dir: str, num_processes: int) -> None:
  """Rewrites a checkpoint step's data position (`<step_dir>/data_iter/process_<i>-of-<n>.json`, see
  checkpoint.py) for a job of `num_processes` processes reading it through `data_iterator`."""
  import json  # pylint: disable=g-import-not-at-top
  d = epath.Path(step_dir) / "data_iter"
  files = sorted(d.glob("process_*-of-*.json"))
  counts = {int(f.name.split("-of-")[1].split(".")[0]) for f in files}
  if not counts:
    raise ValueError(f"{d} holds no data position files (process_<i>-of-<n>.json)")
  n = max(counts)  # the finest split: the job that wrote the checkpoint, or an earlier reshard's source
  if n % num_processes:
    raise ValueError(f"{d} was written by {n} processes; num_processes={num_processes} must divide it")
  states = []
  for i in range(n):
    blob = json.loads((d / f"process_{i}-of-{n}.json").read_text())
    if "json" not in blob:
      raise ValueError(f"{d}: process {i}'s data position is not a JSON iterator state")
    s = blob["json"]
    states.extend(s["shards"] if isinstance(s, dict) and "shards" in s else [s])
  k = len(states) // num_processes
  for j in range(num_processes):
    merged = states[j * k:(j + 1) * k]
    state = merged[0] if k == 1 else {"shards": merged}
    (d / f"process_{j}-of-{num_processes}.json").write_text(json.dumps({"json": state}))
