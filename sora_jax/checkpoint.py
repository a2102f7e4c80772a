"""Checkpoints for every trainer: an orbax CheckpointManager saving, asynchronously and together,
the training state pytree (params, optimizer, EMA, step, rng) and the data iterator's position.

Layout: `<directory>/<step>/state` (orbax PyTree) and `<directory>/<step>/data_iter`
(one JSON file per process, `process_<i>-of-<n>.json`). Orbax writes each step into a temporary
directory and renames it when every part is complete, so a run killed mid-save leaves a `*tmp*`
directory that `latest_step()` ignores: a half-written checkpoint is never picked.

Restore takes an *abstract* state (jax.ShapeDtypeStruct leaves with the target shardings), so a
checkpoint saved on one mesh restores onto any other. `restore_newest` resumes from the newest checkpoint
that restores: one that does not (files deleted, truncated or unreadable after it was written) is named
with the reason in one log line and, in a run's own directory, set aside as `<step>.unusable` (so the
run can save that step again), and the next older one is tried.

`Preemption` is the trainers' SIGTERM handling: save at the next step boundary and exit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from typing import Any

import grain
import orbax.checkpoint as ocp


log = logging.getLogger("sora_jax.checkpoint")
UNUSABLE = ".unusable"


def failure_reason(e: BaseException) -> str:
  """An exception as one short line: the innermost cause (orbax wraps tensorstore's precise error,
  e.g. a truncated stream in a named file, in a generic one), its type and first line."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class Unrestorable(RuntimeError):
  """No checkpoint of a directory restores; the message names each and why, on one line."""


def _free_name(path: str) -> str:
  n, name = 1, path
  while os.path.exists(name):
    name, n = f"{path}-{n}", n + 1
  return name


class _IteratorState:
  """Presents any iterator with get_state()/set_state() to grain's orbax handler.

  Grain's handler stores `get_state()` per process, as bytes for a DataLoader iterator or a JSON-able
  dict for a dataset iterator; the pipeline's wrapper may return either, so wrap both into JSON bytes.
  """

  def __init__(self, it):
    self.it = it

  def get_state(self) -> bytes:
    state = self.it.get_state()
    if isinstance(state, bytes):
      return json.dumps({"bytes": state.decode()}).encode()
    return json.dumps({"json": state}).encode()

  def set_state(self, blob: bytes) -> None:
    d = json.loads(blob)
    self.it.set_state(d["bytes"].encode() if "bytes" in d else d["json"])

  def start_prefetch(self) -> None:  # called by grain's handler after set_state
    if hasattr(self.it, "start_prefetch"):
      self.it.start_prefetch()


class Manager:
  """A thin orbax CheckpointManager: save(step, state, data_iter) and restore(step, abstract_state)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps={save_interval_steps}: must be >= 1")
    self.directory = os.path.abspath(directory)
    self.save_interval_steps = save_interval_steps
    # The interval is decided here (step % interval == 0), not by orbax, whose policy also saves the
    # first step it sees; orbax is asked to save whatever reaches it.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=True,
        # Leftover tmp directories of a killed save are not steps; removing them keeps the dir tidy.
        cleanup_tmp_directories=True)
    self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                      item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                     "data_iter": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest finalised step, or None."""
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state: Any, data_iter=None, force: bool = False) -> bool:
    """Starts an async save of `state` (and the iterator position) at `step`; True if one started.

    Without `force`, steps off `save_interval_steps` are skipped; a step already saved is never
    saved again. The state may be donated right after this returns (orbax copies device arrays to
    host before returning).
    """
    step = int(step)
    if (not force and step % self.save_interval_steps) or step in self._mgr.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(_IteratorState(data_iter))
    return self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter=None) -> Any:
    """The state at `step`, laid out as `abstract_state` says; `data_iter` is moved to that position."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(_IteratorState(data_iter))
    restored = self._mgr.restore(int(step), args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_newest(self, abstract_state: Any, data_iter=None, *, set_aside: bool = True
                     ) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores, or None if there is none.

    Older checkpoints are tried in turn when a newer one fails; each failure is logged as one warning
    naming the checkpoint and the reason. Once an older one restores (so the config fits the run, and
    the newer ones are damaged) and with `set_aside` (a run's own directory), the failed ones are
    renamed `<step>.unusable`: kept for inspection, but no longer steps, so the run saves those steps
    again. Raises Unrestorable naming every failure when none restores (then nothing is set aside: a
    config that does not fit the run fails on every checkpoint).
    """
    failed = []
    for step in sorted(self._mgr.all_steps(), reverse=True):
      path = os.path.join(self.directory, str(step))
      try:
        state = self.restore(step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except  # any damage: try the next older one
        failed.append((path, failure_reason(e)))
        log.warning("checkpoint %s is unusable (%s); trying an older one", path, failure_reason(e))
        continue
      if set_aside and failed:
        for bad, _ in failed:
          os.rename(bad, _free_name(bad + UNUSABLE))
        log.warning("set aside %s as *%s; resuming from step %d", [p for p, _ in failed], UNUSABLE, step)
        self._mgr.reload()
      return step, state
    if failed:
      raise Unrestorable(f"no checkpoint in {self.directory} restores: "
                         + "; ".join(f"{p}: {r}" for p, r in failed))
    return None

  def wait(self) -> None:
    """Blocks until the last async save is finalised on disk."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


class Preempted(Exception):
  """SIGTERM arrived while the training loop was waiting for data."""


class Preemption:
  """SIGTERM (preemption) handling for a training loop, installed for its lifetime.

  The signal sets `flag`; the loop saves a checkpoint and exits at its next step boundary. Data that
  never comes (a stalled or empty pipeline) would keep the loop from ever reaching one, so while it
  waits for data (`with preemption.waiting():`) the signal raises Preempted there instead.
  """

  def __init__(self):
    self.flag = False
    self._waiting = False
    self._prev = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True
    if self._waiting:
      self._waiting = False
      raise Preempted("SIGTERM while waiting for data")

  @contextlib.contextmanager
  def waiting(self):
    if self.flag:
      raise Preempted("SIGTERM while waiting for data")
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._prev)
