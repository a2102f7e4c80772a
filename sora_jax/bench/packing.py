"""Packing efficiency and host throughput of the packed token stream, against two baselines.

    python -m sora_jax.bench.packing --seq_lens 1024,4096 --num_samples 3000      # efficiency table
    python -m sora_jax.bench.packing --throughput --seq_lens 1024,16384 --mixture small --channels 16

Efficiency runs the real grain pipeline (sora_jax.data.pipeline) over the sizes and captions of the
first `num_samples` Shapes train specs (latents of the VAE's 4x8x8 grid, 1x2x2 patches), taking rows from
the endless training stream until one epoch of samples went in (so the packer's end-of-data flush, which
training never sees, is not counted). Baselines over the same stream:
  - pad-to-longest: batches of b = round(L / mean tokens) samples in arrival order, each padded to the
    longest sample of its batch (per-batch shapes: the kindest form; one fixed shape would pad to the
    global longest);
  - size buckets, Open-Sora style: a bucket per exact latent grid (Shapes sizes are discrete, so no
    resize or frame crop is needed: again the kindest form) with a per-bucket batch of floor(L / n)
    samples of n tokens, i.e. the bucket's share of an L-token step; incomplete batches at the end of an
    epoch are dropped (drop_last). Useful fraction is counted against L tokens per step, as a fixed-shape
    (TPU) step would run it; run with per-bucket shapes instead, each bucket is its own compiled program.
Every method's samples per processed token turns into training samples/s at a model throughput of
`--model_tokens_per_s` processed tokens/s (padding included).

Throughput runs the pipeline in this process (num_workers=0, one read thread) over in-memory latent
records, or with --latents_dir over the same records written as a latent data set on disk, and reports tokens per CPU-second (user + system time of this process): the per-core rate.
`--chips` turns it into how many TPU v5p chips at 40% MFU one host core can feed for a pod-scale DiT
(6N FLOPs per token plus attention 12 * depth * width * context; see `chips_fed`).
"""
from __future__ import annotations

import collections
import json
import time

from absl import app, flags
import ml_collections
import numpy as np

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "4096"], "row lengths L")
_NUM = flags.DEFINE_integer("num_samples", 3000, "samples (one epoch of the stream)")
_MIXTURE = flags.DEFINE_string("mixture", "demo", "Shapes size mixture")
_CHANNELS = flags.DEFINE_integer("channels", 16, "latent channels c (token dim D = 4c)")
_PACKERS = flags.DEFINE_list("packers", ["best_fit", "first_fit"], "grain packers to compare")
_BINS = flags.DEFINE_list("bins", ["16", "64"], "num_packing_bins to compare")
_MODEL_TPS = flags.DEFINE_float("model_tokens_per_s", 850.0,
                                "processed tokens/s of the model (docs/hazards.md: demo-size DiT, 2-core CPU)")
_THROUGHPUT = flags.DEFINE_bool("throughput", False, "measure tokens per CPU-second instead")
_BATCHES = flags.DEFINE_integer("batches", 30, "batches timed for --throughput")
_LATENTS_DIR = flags.DEFINE_string("latents_dir", "", "--throughput: write the records as a latent data "
                                   "set here (once) and read them from disk (ArrayRecord + zlib)")

FACTORS = (4, 8, 8)
PATCH = (1, 2, 2)


def mixture(mixture_name: str, n: int, seed: int = 0):
  """Latent grids (t, h, w) and captions of the first n train specs of a Shapes mixture."""
  from sora_jax.data import shapes  # pylint: disable=g-import-not-at-top
  grids, captions = [], []
  for i in range(n):
    s = shapes.sample_spec("train", i, seed, mixture_name)
    grids.append((1 + (s.num_frames - 1) // FACTORS[0], s.height // FACTORS[1], s.width // FACTORS[2]))
    captions.append(shapes.caption(s))
  return grids, captions


class LatentRecords:
  """In-memory latent records of given grids: random means (built once) and a small std."""

  def __init__(self, grids, captions, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.records = [dict(latent_mean=rng.standard_normal((*g, channels), dtype=np.float32),
                         latent_std=np.full((*g, channels), 0.1, np.float32), caption=c, fps=8.0,
                         num_frames=1 + FACTORS[0] * (g[0] - 1))
                    for g, c in zip(grids, captions)]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def on_disk(records: LatentRecords, latents_dir: str, channels: int):
  """The records as a latent data set (written on first use) read back through sources.latent_source."""
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
  try:
    src = sources.latent_source(latents_dir, "train")
    if len(src) == len(records):
      return src
  except FileNotFoundError:
    pass
  examples = (dict(r, height=8 * r["latent_mean"].shape[1], width=8 * r["latent_mean"].shape[2],
                   labels="", source=f"bench/{i}") for i, r in enumerate(records.records))
  sources.write_latent_dataset(latents_dir, "train", examples,
                               stats={"shift": [0.0] * channels, "scale": [1.0] * channels})
  return sources.latent_source(latents_dir, "train")


def data_config(seq_len: int, packer: str, bins: int, batch_size: int = 4) -> ml_collections.ConfigDict:
  """Row shapes scale with L: Lt = 3L / 8 text tokens and S = 3L / 64 segments (the demo's 384 and 48
  at L = 1024)."""
  return ml_collections.ConfigDict(dict(dit=dict(patch=PATCH), data=dict(
      source="latents", latents_dir="", seq_len=seq_len, text_len=3 * seq_len // 8,
      max_text_tokens=24, max_segments=3 * seq_len // 64, batch_size=batch_size, long_clips="crop",
      num_workers=0, shuffle_seed=0, token_budget=0, min_patch_side=2, sample_latents=True,
      stand_in_factors=FACTORS, packer=packer, packing_bins=bins)))


def _pipeline(cfg, records, tokenize, channels):
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  stats = (np.zeros(channels, np.float32), np.ones(channels, np.float32))
  return pipeline.make_iterator(cfg, source=records, tokenize=tokenize, stats=stats)


def packed(seq_len, packer, bins, records, tokenize, channels, n):
  """Rows of the real pipeline until n samples went in: fractions and host rates."""
  cfg = data_config(seq_len, packer, bins)
  it = _pipeline(cfg, records, tokenize, channels)
  tokens = cap = text = text_cap = samples = rows = 0
  t0, c0 = time.perf_counter(), time.process_time()
  while samples < n:
    b = next(it)
    tokens += int((b["segment_ids"] > 0).sum())
    cap += b["segment_ids"].size
    text += int((b["text_segment_ids"] > 0).sum())
    text_cap += b["text_segment_ids"].size
    samples += int(b["seg_valid"].sum())
    rows += b["segment_ids"].shape[0]
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return dict(method=f"packed ({packer}, {bins} bins)", useful=tokens / cap,
              text_useful=text / text_cap, samples_per_row=samples / rows,
              samples_per_ktok=1000 * samples / cap, host_samples_per_s=samples / wall,
              host_tokens_per_cpu_s=tokens / cpu)


def pad_to_longest(seq_len, sizes):
  b = max(1, round(seq_len / np.mean(sizes)))
  used = cap = 0
  for k in range(0, len(sizes) - b + 1, b):
    chunk = sizes[k:k + b]
    used += sum(chunk)
    cap += b * max(chunk)
  n = (len(sizes) // b) * b
  return dict(method=f"pad-to-longest (b={b})", useful=used / cap, samples_per_ktok=1000 * n / cap,
              dropped=len(sizes) - n)


def size_buckets(seq_len, sizes):
  by_size = collections.Counter(sizes)
  used = steps = n_in = shapes_used = 0
  for size, count in by_size.items():
    bs = max(1, seq_len // size)
    full = count // bs
    used += full * bs * size
    steps += full
    n_in += full * bs
    shapes_used += full > 0
  return dict(method=f"size buckets ({len(by_size)} buckets, {shapes_used} step shapes)",
              useful=used / (steps * seq_len), samples_per_ktok=1000 * n_in / (steps * seq_len),
              dropped=len(sizes) - n_in)


def chips_fed(tokens_per_core_s: float, *, params: float = 1.0e9, width: int = 2048, depth: int = 20,
              context: int = 16384, mfu: float = 0.4, peak: float = 459e12) -> dict:
  """TPU v5p chips one host core can feed: core tokens/s over one chip's tokens/s at `mfu`.

  FLOPs per token = 6 * params + 12 * depth * width * context (q k^T and p v, forward and backward,
  over `context` keys). context = the row length is dense attention over the whole row (what
  segment ids cost without block skipping); a smaller context is attention within segments only.
  """
  flops = 6 * params + 12 * depth * width * context
  chip_tps = mfu * peak / flops
  return dict(flops_per_token=flops, chip_tokens_per_s=chip_tps, chips_per_core=tokens_per_core_s / chip_tps)


def main(argv):
  del argv
  from sora_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  grids, captions = mixture(_MIXTURE.value, _NUM.value)
  tok = tok_lib.train_tokenizer(captions, None, 128)
  tokenize = lambda text: tok.encode(text, 24)
  records = LatentRecords(grids, captions, _CHANNELS.value)
  sizes = [t * (h // PATCH[1]) * (w // PATCH[2]) for t, h, w in grids]
  print(json.dumps(dict(mixture=_MIXTURE.value, samples=len(sizes), mean_tokens=float(np.mean(sizes)),
                        max_tokens=int(max(sizes)), channels=_CHANNELS.value)))
  for seq_len in map(int, _SEQ_LENS.value):
    if _THROUGHPUT.value:
      cfg = data_config(seq_len, "best_fit", 16)
      source = on_disk(records, _LATENTS_DIR.value, _CHANNELS.value) if _LATENTS_DIR.value else records
      it = _pipeline(cfg, source, tokenize, _CHANNELS.value)
      next(it)  # start-up (the first packing bins) is not the steady rate
      tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
      for _ in range(_BATCHES.value):
        tokens += int((next(it)["segment_ids"] > 0).sum())
      wall, cpu = time.perf_counter() - t0, time.process_time() - c0
      row = dict(seq_len=seq_len, on_disk=bool(_LATENTS_DIR.value), tokens_per_s=tokens / wall, tokens_per_cpu_s=tokens / cpu)
      row.update({f"v5p_{k}": v for k, v in chips_fed(row["tokens_per_cpu_s"]).items()})
      row.update({f"v5p_in_segment_{k}": v for k, v in
                  chips_fed(row["tokens_per_cpu_s"], context=int(np.mean(sizes))).items()})
      print(json.dumps(row))
      continue
    results = [packed(seq_len, p, int(b), records, tokenize, _CHANNELS.value, len(sizes))
               for p in _PACKERS.value for b in _BINS.value]
    results += [pad_to_longest(seq_len, sizes), size_buckets(seq_len, sizes)]
    for r in results:
      r["seq_len"] = seq_len
      r["train_samples_per_s"] = r["samples_per_ktok"] * _MODEL_TPS.value / 1000
      print(json.dumps(r))


if __name__ == "__main__":
  app.run(main)
