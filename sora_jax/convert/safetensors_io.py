"""Reads published checkpoints' tensors into numpy, for the converters (no torch).

A checkpoint is one `.safetensors` file, or a sharded one: an index `NAME.safetensors.index.json`
whose `weight_map` names the shard file of every tensor (transformers and diffusers write big models
so, e.g. `model-00001-of-00002.safetensors`). `read` takes either file, or the directory holding one:

    tensors = safetensors_io.read("Wan2.1-T2V-1.3B-Diffusers/text_encoder")   # {name: np.ndarray}

Arrays keep their stored dtype (bfloat16 as `ml_dtypes.bfloat16`); the converters cast. Anything
unreadable raises ConversionError with one line naming the file or tensor.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import numpy as np

INDEX_SUFFIX = ".safetensors.index.json"


_T = TypeVar("_T")


def run_converter(required: Mapping[str, str | None], convert: Callable[[], _T],
                  report: Callable[[_T, float], str]) -> _T:
  """A converter's command line: a missing required flag (name -> value) or a ConversionError / OSError
  is one `error:` line and exit status 2; otherwise `convert()` runs with orbax's per-step logging
  quiet and `report(result, seconds)` is printed."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  missing = [f"--{name}" for name, value in required.items() if not value]
  if missing:
    print(f"error: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required", file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
  start = time.time()
  try:
    result = convert()
  except (ConversionError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report(result, time.time() - start), flush=True)
  return result


class ConversionError(ValueError):
  """A checkpoint that cannot be read, or whose tensors do not fit the sora_jax model."""


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())


def resolve(path: str | os.PathLike) -> Path:
  """The checkpoint file `path` names: itself, or the one index (else the one .safetensors) in a directory."""
  p = Path(path)
  if p.is_file():
    return p
  if not p.is_dir():
    raise ConversionError(f"{path}: no such file or directory (give a .safetensors file, a "
                          f"*{INDEX_SUFFIX} index, or a directory holding one)")
  # A sharded checkpoint's directory holds the index and the shards: the index is the checkpoint.
  for pattern in (f"*{INDEX_SUFFIX}", "*.safetensors"):
    found = sorted(p.glob(pattern))
    if len(found) == 1:
      return found[0]
    if len(found) > 1:
      raise ConversionError(f"{path} holds {len(found)} checkpoints ({', '.join(f.name for f in found)}); "
                            "give the file to read")
  raise ConversionError(f"{path} holds no .safetensors file and no *{INDEX_SUFFIX} index")


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint at `path` (a file, an index, or their directory), by name."""
  p = resolve(path)
  if p.name.endswith(INDEX_SUFFIX):
    return _read_sharded(p)
  return _read_file(p)


def _read_file(path: Path, names: list[str] | None = None, *, index: Path | None = None) -> dict:
  """The tensors of one file: all, or exactly `names` (a shard must hold what its index lists, no more)."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework="np") as f:
      held = set(f.keys())
      if names is not None:
        absent = sorted(set(names) - held)
        if absent:
          raise ConversionError(f"{index} lists tensor {absent[0]} in shard {path.name}, which does not "
                                f"hold it ({len(absent)} such tensors)")
        unlisted = sorted(held - set(names))
        if unlisted:
          raise ConversionError(f"shard {path} holds tensor {unlisted[0]}, which {index.name} does not "
                                f"list ({len(unlisted)} such tensors)")
      return {name: f.get_tensor(name) for name in sorted(held)}
  except ConversionError:
    raise
  except SafetensorError as e:
    raise ConversionError(f"{path} is not a readable safetensors file ({_one_line(e)})") from None
  except (TypeError, ValueError) as e:  # e.g. a dtype numpy cannot hold
    raise ConversionError(f"{path}: {_one_line(e)}") from None


def _read_sharded(index: Path) -> dict[str, np.ndarray]:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f"{index} is not a safetensors index (no JSON weight_map: {_one_line(e)})") from None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ConversionError(f"{index}: weight_map must map tensor names to shard file names")
  shards: dict[str, list[str]] = {}
  for name, shard in weight_map.items():
    shards.setdefault(shard, []).append(name)
  out = {}
  for shard, names in sorted(shards.items()):
    file = index.parent / shard
    if not file.is_file():
      raise ConversionError(f"{index} names shard {shard}, which is missing from {index.parent}")
    out.update(_read_file(file, names, index=index))
  return out
