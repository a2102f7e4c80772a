"""A tiny DiT training config and a deterministic synthetic packed-batch stream, shared by the trainer
tests and the training subprocesses they start (resume after SIGKILL, SIGTERM)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """experiments/shapes_demo.py with a tiny DiT, tiny rows and a short run; float32 compute."""
  spec = importlib.util.spec_from_file_location("shapes_demo", os.path.join(_ROOT, "experiments/shapes_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config().copy_and_resolve_references()
  cfg.data.seq_len, cfg.data.text_len, cfg.data.max_segments, cfg.data.batch_size = 64, 16, 4, 4
  d = cfg.dit
  d.in_dim, d.width, d.depth, d.num_heads, d.time_freq_dim, d.ffn_dim = 8, 32, 2, 2, 16, 64
  d.text_width, d.text_depth, d.text_heads, d.vocab_size = 16, 1, 2, 32
  d.dtype = "float32"
  cfg.train.total_steps, cfg.train.log_every_steps, cfg.train.checkpoint_every_steps = 6, 2, 2
  cfg.train.sample_every_steps = 0
  cfg.train.optim.warmup_steps = 2
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


def synthetic_batch(index: int, cfg, *, seed: int = 0) -> dict:
  """Packed batch number `index` (docs/architecture.md keys): 1-3 segments per row of random grids."""
  rng = np.random.default_rng([seed, index])
  b, l, lt, s = cfg.data.batch_size, cfg.data.seq_len, cfg.data.text_len, cfg.data.max_segments
  d = cfg.dit.in_dim
  seg = np.zeros((b, l), np.int32)
  pos = np.zeros((b, l, 3), np.int32)
  tseg = np.zeros((b, lt), np.int32)
  ttok = np.zeros((b, lt), np.int32)
  grid = np.zeros((b, s, 3), np.int32)
  valid = np.zeros((b, s), np.int32)
  is_image = np.zeros((b, s), np.int32)
  for r in range(b):
    off = toff = 0
    for k in range(int(rng.integers(1, min(s, 3) + 1))):
      nt, nh, nw = int(rng.choice([1, 2, 3])), int(rng.integers(2, 4)), int(rng.integers(2, 4))
      n, m = nt * nh * nw, int(rng.integers(2, 5))
      if off + n > l or toff + m > lt:
        break
      t, h, w = np.meshgrid(np.arange(nt), np.arange(nh), np.arange(nw), indexing="ij")
      pos[r, off:off + n] = np.stack([t.ravel(), h.ravel(), w.ravel()], -1)
      seg[r, off:off + n] = k + 1
      ttok[r, toff:toff + m] = rng.integers(4, cfg.dit.vocab_size, m)
      tseg[r, toff:toff + m] = k + 1
      grid[r, k], valid[r, k], is_image[r, k] = (nt, nh, nw), 1, int(nt == 1)
      off, toff = off + n, toff + m
  return dict(tokens=rng.standard_normal((b, l, d)).astype(np.float32), positions=pos, segment_ids=seg,
              loss_mask=(seg > 0).astype(np.float32), text_tokens=ttok, text_segment_ids=tseg,
              seg_grid=grid, seg_fps=valid.astype(np.float32) * 8.0, seg_is_image=is_image, seg_valid=valid)


class SyntheticBatches:
  """An endless, checkpointable stream of synthetic batches (get_state/set_state like grain's)."""

  def __init__(self, cfg, *, seed: int = 0, nan_at: int | None = None, stall_at: int | None = None):
    self.cfg, self.seed, self.nan_at, self.stall_at, self.index = cfg, seed, nan_at, stall_at, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.stall_at is not None and self.index == self.stall_at:  # data that never comes
      import threading  # pylint: disable=g-import-not-at-top
      threading.Event().wait()
    batch = synthetic_batch(self.index, self.cfg, seed=self.seed)
    self.index += 1
    if self.nan_at is not None and self.index == self.nan_at:  # the batch of step `nan_at` (1-based)
      batch["tokens"][0, 0, 0] = np.nan
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def to_global(batch, mesh):
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.to_global(batch, mesh)


def run(workdir: str, stall_at: int | None = None, **overrides):
  """Trains the tiny config on synthetic data (what the subprocess tests run); the data stalls forever
  before batch `stall_at`."""
  from sora_jax import train  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(**overrides)
  return train.train(cfg, workdir, data=(SyntheticBatches(cfg, stall_at=stall_at), to_global))


if __name__ == "__main__":
  import json
  import sys
  import logging
  logging.basicConfig(level=logging.INFO, stream=sys.stdout)
  logging.getLogger("absl").setLevel(logging.WARNING)
  run(sys.argv[1], **json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}"))
