"""Replacing files and directories so that a reader finds the old version or the new one, never a mix
and never nothing: data sets, latents, bundles and reports are built beside their destination and
swapped in only when complete.

A file is written to a sibling temporary name and `os.replace`d over the old one (atomic on POSIX).
A directory cannot be swapped atomically, so `replace_dir` renames the old one aside
(`<out>.previous`), renames the new one in, then deletes the old one; a crash between the two renames
leaves `<out>.previous`, which the next `replace_dir` (or `recover_dir`) moves back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
from typing import Any

import numpy as np

PREVIOUS = ".previous"


def _fsync_dir(path: Path) -> None:
  # A rename is durable only once its directory is synced; without it a power cut may undo the swap.
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` through a sibling temporary file: `path` is the old file or the new one."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def _json_value(x):
  """json.dumps' `default`: numpy arrays and scalars as lists and numbers, records by their to_dict()."""
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  if hasattr(x, "to_dict"):
    return x.to_dict()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
  """`obj` as indented JSON (numpy values included), written as `write_bytes` writes."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_value))


def recover_dir(out: str | os.PathLike) -> None:
  """Finishes or undoes a `replace_dir` that was killed between its two renames."""
  out = Path(out)
  previous = out.with_name(out.name + PREVIOUS)
  if not previous.exists():
    return
  if out.exists():  # the new one is in place: the old one only awaited deletion
    shutil.rmtree(previous, ignore_errors=True)
  else:
    os.rename(previous, out)


def replace_dir(staged: str | os.PathLike, out: str | os.PathLike) -> None:
  """Moves the complete directory `staged` to `out` (same file system), replacing what is there."""
  staged, out = Path(staged), Path(out)
  recover_dir(out)
  previous = out.with_name(out.name + PREVIOUS)
  _fsync_dir(staged)
  if out.exists():
    os.rename(out, previous)
  os.rename(staged, out)
  _fsync_dir(out.parent)
  shutil.rmtree(previous, ignore_errors=True)
