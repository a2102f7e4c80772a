"""Peak host memory of a fine-tuning run on this CPU: LoRA against full fine-tuning (docs/benchmarks.md,
"Fine-tuning and LoRA").

    python -m sora_jax.bench.finetune_memory [--width 256] [--depth 30] [--rank 16] [--steps 3]

Wan 2.1 1.3B's layout (experiments/wan21_finetune.py:size=1.3b: 30 blocks, FFN 5.83x the width, 4096-wide
UMT5 features, heads of 128) at a tiny width, trained by the real trainer (train.train: compile, steps,
a checkpoint at the end) on synthetic packed rows of cached text features, once fully and once with
LoRA adapters of `--rank` on every projection. Each mode runs in a fresh process (peak RSS never goes
down within one; both measured the same way): the process's peak RSS (ru_maxrss) and the same minus the
RSS just before `train.train` (Python, JAX and the data). On CPU the device is the host, so the train state
(parameters, EMA, optimizer moments, gradients), the activations and the checkpoint's host copy all count.
The claim under test: the LoRA run's peak is below the full run's.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

from sora_jax.bench import host_memory

_WIDTH = flags.DEFINE_integer("width", 256, "DiT width (heads of 128)")
_DEPTH = flags.DEFINE_integer("depth", 30, "DiT blocks (Wan 2.1 1.3B: 30)")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank")
_STEPS = flags.DEFINE_integer("steps", 3, "train steps (a checkpoint at the last)")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "packed row length")
_CHILD = flags.DEFINE_string("child", "", "internal: 'full' or 'lora', measured in this process")


class Batches:
  """An endless, checkpointable stream of one synthetic packed batch: 4 segments per row of 2 x 4 x 8
  latent patches, each with a 512-token caption of random features (Wan's padded UMT5 layout)."""

  def __init__(self, cfg):
    d, rng = cfg.data, np.random.default_rng(0)
    b, l, lt, s = int(d.batch_size), int(d.seq_len), int(d.text_len), int(d.max_segments)
    n = l // s
    grid = np.stack(np.meshgrid(np.arange(2), np.arange(4), np.arange(n // 8), indexing="ij"), -1).reshape(-1, 3)
    seg = np.repeat(np.arange(1, s + 1), n)[None].repeat(b, 0).astype(np.int32)
    per = lt // s
    self.batch = dict(
        tokens=rng.standard_normal((b, l, int(cfg.dit.in_dim))).astype(np.float32),
        positions=np.tile(grid, (s, 1))[None].repeat(b, 0).astype(np.int32), segment_ids=seg,
        loss_mask=np.ones((b, l), np.float32),
        text_tokens=rng.standard_normal((b, lt, int(cfg.dit.text_dim))).astype(np.float32),
        text_segment_ids=np.repeat(np.arange(1, s + 1), per)[None].repeat(b, 0).astype(np.int32),
        seg_grid=np.tile([[2, 4, n // 8]], (b, s, 1)).astype(np.int32),
        seg_fps=np.full((b, s), 16.0, np.float32), seg_is_image=np.zeros((b, s), np.int32),
        seg_valid=np.ones((b, s), np.int32))
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.index += 1
    return dict(self.batch)

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def config(mode: str, width: int, depth: int, rank: int, steps: int, seq_len: int):
  from experiments import wan21_finetune  # pylint: disable=g-import-not-at-top
  cfg = wan21_finetune.get_config(f"size=1.3b,lora={rank if mode == 'lora' else 0}")
  cfg.dit.update(dict(width=width, depth=depth, num_heads=max(width // 128, 1),
                      ffn_dim=int(round(width * 8960 / 1536 / 64)) * 64, attention="reference", remat="none",
                      dtype="float32"))
  cfg.data.update(dict(seq_len=seq_len, max_segments=4, text_len=4 * 512, batch_size=1))
  cfg.mesh.update(dict(data=1, fsdp=1, tensor=1))
  cfg.train.update(dict(total_steps=steps, checkpoint_every_steps=steps, log_every_steps=1))
  return cfg


def _measure(mode: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from sora_jax import train  # pylint: disable=g-import-not-at-top
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = config(mode, _WIDTH.value, _DEPTH.value, _RANK.value, _STEPS.value, _SEQ_LEN.value)
  data = (Batches(cfg), pipeline.to_global)
  base = host_memory.rss_mib()
  t0 = time.time()
  with tempfile.TemporaryDirectory() as work:
    train.train(cfg, work, data=data, devices=jax.devices()[:1])
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    setup = train.make_setup(cfg, mesh)
    ckpt = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(work, "checkpoints"))
               for f in fs)
  return {"mode": mode, "trained_params_m": round(setup.num_params / 1e6, 3),
          "frozen_params_m": round(setup.num_frozen / 1e6, 3), **host_memory.peak_since(base),
          "checkpoint_mib": round(ckpt / 2**20, 1), "seconds": round(time.time() - t0, 1)}


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_measure(_CHILD.value)), flush=True)
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device in each process
  rows = []
  for mode in ("full", "lora"):
    rows.append(host_memory.run_child(
        "sora_jax.bench.finetune_memory", [f"--child={mode}", f"--width={_WIDTH.value}",
                                           f"--depth={_DEPTH.value}", f"--rank={_RANK.value}",
                                           f"--steps={_STEPS.value}", f"--seq_len={_SEQ_LEN.value}"],
        env, mode))
  print("| mode | trained M | frozen M | peak RSS MiB | above baseline MiB | checkpoint MiB | seconds |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['mode']} | {r['trained_params_m']} | {r['frozen_params_m']} | {r['peak_rss_mib']} | "
          f"{r['peak_above_baseline_mib']} | {r['checkpoint_mib']} | {r['seconds']} |")
  full, lora = rows
  print(f"LoRA peak RSS {lora['peak_rss_mib']:.0f} MiB vs full {full['peak_rss_mib']:.0f} MiB "
        f"({100 * (lora['peak_rss_mib'] / full['peak_rss_mib'] - 1):+.1f}%; above baseline "
        f"{100 * (lora['peak_above_baseline_mib'] / full['peak_above_baseline_mib'] - 1):+.1f}%)")
  if lora["peak_rss_mib"] >= full["peak_rss_mib"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
