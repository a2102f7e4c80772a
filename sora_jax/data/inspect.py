"""Looks at the packed token stream: one JSON line of statistics, optionally the batches as .npz.

    python -m sora_jax.data.inspect --config experiments/shapes_demo.py --num_batches 20
    python -m sora_jax.data.inspect --config experiments/shapes_demo.py --config.data.source=shapes \\
        --num_batches 4 --dump /tmp/batches.npz

The line holds: video and text padding fractions, samples / segments and real tokens per batch, the
steady-state rate after the first batch (tokens/s, samples/s, and with 0 workers tokens per CPU-second
of this process: the per-core figure), the time to the first batch, and the long-clip accounting:
samples dropped, cropped in time (and latent frames cut), and spatially downscaled. `--dump` writes every
key of the batches concatenated along the leading batch axis ([num_batches * B, ...]).
"""
from __future__ import annotations

import json
import time

from absl import flags
import numpy as np

from sora_jax import config as config_lib

_NUM_BATCHES = flags.DEFINE_integer("num_batches", 10, "batches to read", lower_bound=1)
_SPLIT = flags.DEFINE_string("split", "train", "data set split")
_DUMP = flags.DEFINE_string("dump", "", "write the batches to this .npz")
_WORKDIR = flags.DEFINE_string("workdir", None, "resolves empty data paths to <workdir>/../data/...")


def batch_stats(batch: dict) -> dict:
  """Counts of one batch (sums; `summarize` turns them into fractions and means)."""
  valid = batch["seg_valid"] > 0
  return {
      "rows": int(batch["segment_ids"].shape[0]),
      "tokens": int((batch["segment_ids"] > 0).sum()),
      "capacity": int(batch["segment_ids"].size),
      "text_tokens": int((batch["text_segment_ids"] > 0).sum()),
      "text_capacity": int(batch["text_segment_ids"].size),
      "samples": int(valid.sum()),
      "images": int((batch["seg_is_image"] * valid).sum()),
      "dropped": int(batch["seg_dropped"].sum()),
      "cropped": int(((batch["seg_cropped"] > 0) & valid).sum()),
      "frames_cut": int(batch["seg_cropped"].sum()),
      "downscaled": int(((batch["seg_scale"] > 1) & valid).sum()),
  }


def summarize(per_batch: list[dict]) -> dict:
  tot = {k: sum(s[k] for s in per_batch) for k in per_batch[0]}
  n = len(per_batch)
  return {
      "batches": n,
      "rows_per_batch": tot["rows"] / n,
      "padding_fraction": 1 - tot["tokens"] / tot["capacity"],
      "text_padding_fraction": 1 - tot["text_tokens"] / tot["text_capacity"],
      "samples_per_batch": tot["samples"] / n,
      "tokens_per_batch": tot["tokens"] / n,
      "images_fraction": tot["images"] / max(tot["samples"], 1),
      "dropped": tot["dropped"],
      "cropped": tot["cropped"],
      "frames_cut": tot["frames_cut"],
      "downscaled": tot["downscaled"],
  }


def main(argv):
  del argv
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = config_lib.get_config()
  t0, c0 = time.perf_counter(), time.process_time()
  it = pipeline.make_iterator(cfg, split=_SPLIT.value, workdir=_WORKDIR.value)
  batches, stats = [], []
  t1 = c1 = None
  for _ in range(_NUM_BATCHES.value):
    try:
      batch = next(it)
    except StopIteration:
      break
    if t1 is None:  # the first batch pays start-up (workers, packing bins); the rate excludes it
      t1, c1 = time.perf_counter(), time.process_time()
    stats.append(batch_stats(batch))
    if _DUMP.value:
      batches.append(batch)
  if not stats:
    raise SystemExit(f"error: split {_SPLIT.value!r} yielded no batches")
  t2, c2 = time.perf_counter(), time.process_time()
  out = {"split": _SPLIT.value, "seq_len": int(cfg.data.seq_len), "text_len": int(cfg.data.text_len),
         "num_workers": int(cfg.data.num_workers), **summarize(stats),
         "first_batch_s": t1 - t0}
  later = stats[1:]
  if later:
    toks, samples = sum(s["tokens"] for s in later), sum(s["samples"] for s in later)
    out.update(tokens_per_s=toks / (t2 - t1), samples_per_s=samples / (t2 - t1))
    if not int(cfg.data.num_workers):  # with workers the work is in other processes
      out["tokens_per_cpu_s"] = toks / max(c2 - c1, 1e-9)
  print(json.dumps(out, sort_keys=False))
  if _DUMP.value:
    np.savez(_DUMP.value, **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})


if __name__ == "__main__":
  config_lib.run(main)
