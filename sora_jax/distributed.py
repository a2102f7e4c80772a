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

CPU processes (tests, this machine) exchange collectives over gloo (docs/hazards.md).

Jobs that are not a jitted step over a global mesh (sampling, evaluation) split their work items between
the processes with `map_shared`: each process runs its share on its own devices, and every process gets
all results, in item order. Process 0 writes the outputs.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

from absl import flags
from etils import epath
import jax
import numpy as np

from sora_jax import platforms

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
  if environ is None and platforms.tpu_device_present():
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
  # CPU collectives across processes need an implementation; gloo ships with jaxlib (docs/hazards.md).
  # Harmless for TPU and GPU processes, whose collectives do not use it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  _initialized = True
  quiet_other_processes()
  log.info("distributed (%s): process %d of %d, %d local / %d global devices", source,
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count()


def quiet_other_processes() -> None:
  """Processes other than 0 keep warnings and errors only (every process would print the same): their
  INFO logs are dropped and their stdout (progress and result lines) goes to /dev/null; stderr stays."""
  if jax.process_index() != 0:
    logging.disable(logging.INFO)  # absl logs through Python logging too
    sys.stdout = open(os.devnull, "w")  # pylint: disable=consider-using-with


def is_main() -> bool:
  """True on the process that logs, writes metrics and prints results."""
  return jax.process_index() == 0


# ------------------------------------------------------------------------------- work split by items
_barriers = itertools.count()


def block_each_step() -> bool:
  """Whether a training loop should wait for each step before dispatching the next: on CPU, where fake
  devices and gloo deadlock on collectives dispatched ahead (docs/hazards.md) and the wait costs nothing."""
  return jax.default_backend() == "cpu"


def barrier(timeout_s: float = 3 * 3600) -> None:
  """Returns when every process has reached its matching call (call them in the same order everywhere).

  A barrier of the coordination service, not a device collective: processes may arrive hours apart
  (one sampling a minute-long video while another waits), where the first CPU (gloo) collective between
  two processes fails after 30 s. No-op on one process.
  """
  if jax.process_count() == 1:
    return
  # orbax's public barrier on the client jax.distributed.initialize() made (orbax's own saves wait on
  # the same service).
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  multihost.get_barrier_sync_fn()(key=f"sora_jax_barrier_{next(_barriers)}", timeout_ms=int(timeout_s * 1000))


# ------------------------------------------------------------------- objects between the processes
# What travels between the processes (videos, scores, manifests, errors) is a tree of dicts, lists,
# tuples, strings, numbers, None, arrays and sora_jax's own dataclasses (the detector's scores). It is
# encoded as JSON plus an .npz of the arrays, read back with allow_pickle=False: unlike pickle, a payload
# cannot run code in the process that reads it (a dataclass is rebuilt only if it is one of sora_jax's,
# already imported, by its own constructor).

def encode(obj: Any) -> bytes:
  """`obj` as bytes that `decode` turns back into an equal tree; TypeError for any other type."""
  arrays: list[np.ndarray] = []

  def enc(x):
    if x is None or isinstance(x, (bool, int, float, str)):
      return x
    if isinstance(x, (list, tuple)):
      return {"t" if isinstance(x, tuple) else "l": [enc(v) for v in x]}
    if isinstance(x, dict):
      return {"d": [[enc(k), enc(v)] for k, v in x.items()]}
    if isinstance(x, bytes):
      arrays.append(np.frombuffer(x, np.uint8))
      return {"b": len(arrays) - 1}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
      cls = type(x)
      if not cls.__module__.startswith("sora_jax."):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} cannot be sent between processes: only "
                        "sora_jax's dataclasses")
      return {"c": [cls.__module__, cls.__qualname__,
                    [[f.name, enc(getattr(x, f.name))] for f in dataclasses.fields(x) if f.init]]}
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
      a = np.asarray(x)
      if a.dtype.hasobject:
        raise TypeError(f"an array of Python objects cannot be sent between processes ({a.dtype})")
      arrays.append(a)
      return {"a" if isinstance(x, (np.ndarray, jax.Array)) else "s": len(arrays) - 1}
    raise TypeError(f"{type(x).__name__} cannot be sent between processes: send dicts, lists, tuples, "
                    "str, numbers, None or arrays")

  head = json.dumps(enc(obj)).encode()
  buf = io.BytesIO()
  np.savez(buf, *arrays)
  return len(head).to_bytes(8, "little") + head + buf.getvalue()


def decode(blob: bytes) -> Any:
  """The tree `encode` wrote (arrays read with allow_pickle=False)."""
  n = int.from_bytes(blob[:8], "little")
  head = json.loads(blob[8:8 + n])
  with np.load(io.BytesIO(blob[8 + n:]), allow_pickle=False) as z:
    arrays = [z[f"arr_{i}"] for i in range(len(z.files))]

  def dec(x):
    if not isinstance(x, dict):
      return x
    (tag, v), = x.items()
    if tag == "l":
      return [dec(e) for e in v]
    if tag == "t":
      return tuple(dec(e) for e in v)
    if tag == "d":
      return {dec(k): dec(e) for k, e in v}
    if tag == "b":
      return arrays[v].tobytes()
    if tag == "c":
      module, name, fields = v
      cls = getattr(sys.modules.get(module) if module.startswith("sora_jax.") else None, name, None)
      if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"a payload names {module}.{name}, which is not an imported sora_jax dataclass")
      return cls(**{k: dec(e) for k, e in fields})
    return arrays[v] if tag == "a" else arrays[v][()]  # "s": a numpy scalar

  return dec(head)


def allgather_objects(obj: Any) -> list:
  """[the object of process 0, of process 1, ...] on every process (`encode`d: a tree of dicts, lists,
  tuples, str, numbers, None and arrays).

  `barrier` first, so the processes enter the device collective together however late one arrives.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  blob = np.frombuffer(encode(obj), np.uint8)
  barrier()
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  got = np.asarray(multihost_utils.process_allgather(padded))
  return [decode(got[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


class RemoteError(RuntimeError):
  """A work item failed on another process (with an exception of no builtin type that `_raise` keeps)."""


# Raised again on the other processes as these builtin types (the entry points catch them by type).
_KEPT = (FileNotFoundError, ValueError, TypeError, KeyError)


def _error(e: Exception) -> tuple:
  kept = next((k for k in _KEPT if isinstance(e, k)), None)
  return ("error", type(e).__name__, str(e), kept.__name__ if kept else "")


def _raise(r: tuple) -> None:
  _, name, msg, kept = r
  raise {k.__name__: k for k in _KEPT}.get(kept, RemoteError)(msg if kept else f"{name}: {msg}")


def map_shared(fn: Callable[[Any], Any], items: Sequence) -> list:
  """[fn(item) for item in items], with the items split between the processes (round r: process p runs
  item r * P + p); every process returns the whole list. Results travel once per round, so the
  processes hold one round's results in flight, not all of them.

  An item that raises anywhere raises on every process after its round (the raising process re-raises
  its own exception; the others a builtin of the same kind with its message, else RemoteError), so no
  process is left waiting in a collective.
  """
  pc, pi = jax.process_count(), jax.process_index()
  if pc == 1:
    return [fn(x) for x in items]
  out = []
  for start in range(0, len(items), pc):
    mine, own_error, result = start + pi, None, None
    if mine < len(items):
      try:
        result = ("ok", fn(items[mine]))
      except Exception as e:  # pylint: disable=broad-except
        own_error, result = e, _error(e)
    gathered = allgather_objects(result)[:len(items) - start]
    if own_error is not None:
      raise own_error
    for r in gathered:
      if r[0] == "error":
        _raise(r)
    out.extend(r[1] for r in gathered)
  return out


def write_on_main(fn: Callable[[], Any]) -> Any:
  """Runs `fn` (writing outputs) on process 0 only; every process returns after it has finished, with
  its result (sent to the others, see `encode`). An exception in `fn` is raised on every process (see
  map_shared)."""
  return map_shared(lambda _: fn(), [None])[0]  # one item: process 0's, in round 0


# ------------------------------------------------------------------------- changing the process count
# The global batch of a step is the concatenation of the processes' host-local batches in process order
# (pipeline.to_global places process p's rows before process p + 1's). A job restarted on M processes
# can therefore continue the exact stream of a job of N processes (M divides N): process j reads the N/M
# consecutive shards j*N/M, ... of the N-process stream and concatenates them. The trainer does this on
# its own when it resumes checkpoints written by another number of processes (`data_iterator`).

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


def _position_files(step_dir) -> tuple[epath.Path, int]:
  """A checkpoint step's data_iter folder and the finest split its files hold (the job that wrote the
  step, or an earlier reshard's source), or 0 when it holds none."""
  d = epath.Path(step_dir) / "data_iter"
  if not d.exists():
    return d, 0
  return d, max((int(f.name.split("-of-")[1].split(".")[0]) for f in d.glob("process_*-of-*.json")), default=0)


def stream_processes(checkpoint_dir: str) -> int | None:
  """How many processes' stream the newest data position in `checkpoint_dir` continues (the processes
  that wrote it times the shards each merged), or None where no step holds one."""
  root = epath.Path(checkpoint_dir)
  if not root.exists():
    return None
  for step in sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True):
    d, n = _position_files(root / str(step))
    if n:
      s = json.loads((d / f"process_0-of-{n}.json").read_text()).get("json")
      return n * (len(s["shards"]) if isinstance(s, dict) and "shards" in s else 1)
  return None


def data_iterator(cfg, checkpoint_dir: str | None = None, *, split: str = "train", **kwargs):
  """This process's iterator of the packed stream, continuing the data position saved in `checkpoint_dir`
  (None: a fresh stream) on any number of processes that divides the number that began the stream.

  On the processes that began it, the pipeline's own per-process iterator. On fewer (a job resumed on
  fewer hosts): each process reads its consecutive shards of the larger job's stream, merged, and
  process 0 first adds the position files for this many processes to every step that lacks them
  (`reshard_data_position`; the originals stay), so that any of them restores. Extra keyword arguments
  go to `pipeline.make_iterator`.
  """
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pc, pi = jax.process_count(), jax.process_index()
  n = (stream_processes(checkpoint_dir) if checkpoint_dir else None) or pc
  if n == pc:
    return pipeline.make_iterator(cfg, split=split, **kwargs)
  if n % pc:
    raise ValueError(f"the checkpoints in {checkpoint_dir} continue the data stream of {n} processes; "
                     f"this job has {pc}: resume on a number of processes that divides {n}")

  def reshard_all():
    for step_dir in epath.Path(checkpoint_dir).iterdir():
      d, written = _position_files(step_dir)
      if step_dir.name.isdigit() and written and not (d / f"process_0-of-{pc}.json").exists():
        reshard_data_position(str(step_dir), pc)

  write_on_main(reshard_all)
  k = n // pc
  return MergedShards([pipeline.make_iterator(cfg, split=split, process_index=pi * k + i,
                                              process_count=n, **kwargs) for i in range(k)])


def reshard_data_position(step_dir: str, num_processes: int) -> None:
  """Writes a checkpoint step's data position (`<step_dir>/data_iter/process_<i>-of-<n>.json`, see
  checkpoint.py) for a job of `num_processes` processes reading it through `data_iterator`."""
  d, n = _position_files(step_dir)
  if not n:
    raise ValueError(f"{d} holds no data position files (process_<i>-of-<n>.json)")
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
