"""Resumable, multi-process encoding of a data set's splits into .npz shards: the loop of the offline
encoders (data_pipelines/encode_latents.py, encode_text.py).

A split of n records is cut into shards of `shard_size` records; process p of P encodes shards p, p + P,
...; a shard is written atomically, so one that exists is complete and a re-run skips it (an interrupted
job resumes where it stopped).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


def write_npz(path: Path, arrays: dict) -> None:
  """Writes `arrays` to `path` atomically: a shard file that exists is complete."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def encode_splits(job: str, splits: Sequence[str], open_split: Callable[[str], Any], shard_dir: Path,
                  shard_size: int, encode: Callable[[Any, range, Path], int], *, unit: str, summary: str,
                  source: str, fail: Callable[[str], None]) -> dict[str, list[Path]]:
  """Encodes this process's missing shards of every split; returns {split: all its shard paths}.

  `open_split(split)` gives the split's records (FileNotFoundError / ValueError: it has none; a missing
  train split calls `fail`, naming `source`, another is skipped); `encode(records, indices, path)` writes
  one shard and returns how many items it encoded. After a split, `summary` is printed, formatted with
  split, n (records), shards, done_before (shards that existed) and encoded (the sum of encode's).
  """
  import jax  # pylint: disable=g-import-not-at-top
  pid, nproc = jax.process_index(), jax.process_count()
  t0 = time.time()
  out = {}
  for split in splits:
    try:
      src = open_split(split)
    except (FileNotFoundError, ValueError) as e:
      if split == "train":
        fail(f"{source}: no train split ({str(e).splitlines()[0]})")
      print(f"{job}: skipping split {split!r}: {str(e).splitlines()[0]}")
      continue
    n = len(src)
    num_shards = max(1, -(-n // shard_size))
    paths = [shard_dir / split / f"shard-{k:05d}-of-{num_shards:05d}.npz" for k in range(num_shards)]
    out[split] = paths
    done_before = sum(p.exists() for p in paths)
    encoded = 0
    for k in range(pid, num_shards, nproc):
      if paths[k].exists():
        continue
      idx = range(k * shard_size, min(n, (k + 1) * shard_size))
      encoded += encode(src, idx, paths[k])
      print(f"{job}: {split} shard {k + 1}/{num_shards} ({len(idx)} {unit}) {time.time() - t0:.0f}s",
            flush=True)
    print(f"{job}: " + summary.format(split=split, n=n, shards=num_shards, done_before=done_before,
                                      encoded=encoded), flush=True)
  return out
