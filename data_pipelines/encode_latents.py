"""Encodes a video data set into a latent data set with a trained VAE (docs/architecture.md).

    python data_pipelines/encode_latents.py --vae runs/demo/vae --data_dir D --out_dir L \
        [--splits train,validation,test] [--shard_size 64] [--max_tile_pixels 0] [--latent_stats data]

Records of L/latents/<split> hold `latent_mean` and `latent_std` float32 [t, h, w, c] (the posterior,
unnormalised) and the video record's caption, num_frames, height, width, fps, labels and source.
L/latent_stats.json holds {"shift": [c], "scale": [c], "vae": {...}}: the per-channel mean and std of
the train split's latent means, so that models see z_norm = (z - shift) / scale. With
`--latent_stats bundle` they are instead the --vae bundle's own latent_stats.json: a DiT that is to be
fine-tuned (a converted Wan 2.1: Wan's published latents_mean/std) must see its latents normalised as
in its training, not by this data set's statistics (docs/finetune.md).

The VAE is recorded as {"path", "step", "sha256" of its weights}: in latent_stats.json ("vae_source"),
inside each latent split (vae.json) and beside the shards. A re-run with a different VAE (one trained
further, say) says so and encodes everything again: latents, statistics and VAE always match, and train
and export refuse a mix (sora_jax.data.sources.check_latents).

Work is cut into shards of --shard_size records. Each process takes the shards k with
k % process_count == process_index, and spreads their clips over its local devices; each finished
shard is written atomically to L/_shards/<split>/ and skipped on a re-run, so an interrupted run
resumes where it stopped. When every shard exists, process 0 writes the data sets (tfds ArrayRecord,
via sora_jax.data.sources) and the stats. Clips are encoded chunked (frame 0, then ft frames at a
time), so memory is flat in clip length; frames above --max_tile_pixels are tiled.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from absl import flags
import numpy as np

from sora_jax import atomic
from sora_jax import config as config_lib
from sora_jax import distributed  # defines --coordinator/--num_processes/--process_id
from sora_jax.data import shards

_VAE = flags.DEFINE_string("vae", None, "VAE workdir or inference bundle")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "video data set directory (tfds data_dir)")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "where the latent data set goes")
_SPLITS = flags.DEFINE_list("splits", ["train", "validation", "test"], "splits to encode (missing "
                            "splits other than train are skipped with a note)")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 64, "records per resumable shard", lower_bound=1)
_MAX_TILE = flags.DEFINE_integer("max_tile_pixels", 0, "tile frames above this many pixels; 0 = never",
                               lower_bound=0)
_LATENT_STATS = flags.DEFINE_enum("latent_stats", "data", ["data", "bundle"],
                                  "shift/scale from the train split's latents, or the --vae bundle's "
                                  "latent_stats.json (fine-tuning a converted model)")

META_KEYS = ("caption", "num_frames", "height", "width", "fps", "labels", "source")


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def encode_shard(vae_per_device, src, indices, path: Path, *, max_tile_pixels: int) -> None:
  """Encodes records `indices` of `src` (clip i on local device i % n) and writes one .npz atomically."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  pending = []
  for j, i in enumerate(indices):
    rec = src[i]
    dev = j % len(vae_per_device)
    x = jax.device_put(jnp.asarray(np.asarray(rec["video"])[None], jnp.float32) / 127.5 - 1.0,
                       jax.local_devices()[dev])
    mean, logvar = vae_per_device[dev].encode_chunked(x, max_tile_pixels=max_tile_pixels)
    pending.append((rec, mean, logvar))  # dispatched asynchronously: devices work in parallel
  arrays, meta = {}, []
  channel_sum = channel_sq = None
  count = 0
  for j, (rec, mean, logvar) in enumerate(pending):
    m = np.asarray(mean[0], np.float32)
    arrays[f"mean_{j}"] = m
    arrays[f"std_{j}"] = np.exp(0.5 * np.asarray(logvar[0], np.float32))
    meta.append({k: (rec[k].item() if isinstance(rec[k], np.generic) else rec[k]) for k in META_KEYS})
    flat = m.reshape(-1, m.shape[-1]).astype(np.float64)
    channel_sum = flat.sum(0) if channel_sum is None else channel_sum + flat.sum(0)
    channel_sq = (flat ** 2).sum(0) if channel_sq is None else channel_sq + (flat ** 2).sum(0)
    count += flat.shape[0]
  arrays["channel_sum"], arrays["channel_sq"] = channel_sum, channel_sq
  arrays["count"] = np.asarray(count)
  arrays["meta"] = np.asarray(json.dumps(meta))
  shards.write_npz(path, arrays)


def shard_examples(paths: list[Path]):
  """The latent records of a split's shards, in record order."""
  for p in paths:
    with np.load(p) as z:
      meta = json.loads(str(z["meta"]))
      for j, m in enumerate(meta):
        yield {"latent_mean": z[f"mean_{j}"], "latent_std": z[f"std_{j}"], **m}


def channel_stats(paths: list[Path]) -> tuple[list[float], list[float]]:
  """Per-channel (shift, scale) = mean and std of the latent means over the shards' positions."""
  total = sq = None
  count = 0
  for p in paths:
    with np.load(p) as z:
      total = z["channel_sum"] if total is None else total + z["channel_sum"]
      sq = z["channel_sq"] if sq is None else sq + z["channel_sq"]
      count += int(z["count"])
  mean = total / count
  std = np.sqrt(np.maximum(sq / count - mean ** 2, 1e-12))
  return mean.tolist(), std.tolist()


def discard_stale_shards(out_dir: Path, record: dict, *, is_main: bool) -> None:
  """Removes finished shards that another VAE encoded (they would be skipped as done, and mixed with this
  VAE's), saying so; then records this VAE beside the shards."""
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
  shards, own = out_dir / "_shards", out_dir / "_shards" / sources.LATENTS_VAE
  before = json.loads(own.read_text()) if own.is_file() else None
  if before is not None and before.get("sha256") == record["sha256"]:
    return
  if is_main:
    if any(shards.glob("*/*.npz")):
      print(f"encode_latents: the shards in {shards} come from {sources.describe_vae(before)}; --vae is "
            f"{sources.describe_vae(record)}: encoding every split again", flush=True)
      for split_dir in shards.iterdir():
        if split_dir.is_dir():
          shutil.rmtree(split_dir)
    shards.mkdir(parents=True, exist_ok=True)
    atomic.write_text(own, json.dumps(record, indent=2))


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
  from sora_jax.train_vae import load  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.WARNING)
  distributed.initialize()  # on a multi-host launch, each process then encodes its share of shards
  for name, flag in (("--vae", _VAE), ("--data_dir", _DATA_DIR), ("--out_dir", _OUT_DIR)):
    if not flag.value:
      _fail(f"{name} is required")
  out_dir = Path(_OUT_DIR.value)
  try:
    vae, cfg, step = load(_VAE.value)
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e).splitlines()[0])
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(vae)
  per_device = [nnx.merge(graphdef, jax.device_put(state, d)) for d in jax.local_devices()]
  pid, nproc = jax.process_index(), jax.process_count()
  record = {"path": os.path.abspath(_VAE.value), "step": step,
            "sha256": bundle_lib.params_sha256(nnx.to_pure_dict(nnx.state(vae, nnx.Param)))}
  discard_stale_shards(out_dir, record, is_main=pid == 0)
  if nproc > 1:  # no process encodes into the shard folder before process 0 has emptied it
    multihost_utils.sync_global_devices("encode_latents stale shards")

  def encode(src, idx, path) -> int:
    encode_shard(per_device, src, idx, path, max_tile_pixels=_MAX_TILE.value)
    return len(idx)

  t0 = time.time()
  splits = shards.encode_splits(
      "encode_latents", _SPLITS.value, lambda split: sources.video_source(_DATA_DIR.value, split),
      out_dir / "_shards", _SHARD_SIZE.value, encode, unit="clips",
      summary="{split}: {n} clips in {shards} shards ({done_before} were done before this run)",
      source=f"--data_dir {_DATA_DIR.value}", fail=_fail)
  if nproc > 1:
    multihost_utils.sync_global_devices("encode_latents shards")
  if pid != 0:
    return
  if "train" not in splits:
    _fail("the train split is needed for the latent statistics")
  if _LATENT_STATS.value == "bundle":
    given = Path(_VAE.value) / "latent_stats.json"
    if not given.is_file():
      _fail(f"--latent_stats=bundle: {given} does not exist (--vae must be a bundle)")
    bundle_stats = json.loads(given.read_text())
    shift, scale = bundle_stats["shift"], bundle_stats["scale"]
  else:
    shift, scale = channel_stats(splits["train"])
  stats = {"shift": shift, "scale": scale, "vae": cfg.vae.to_dict(), "vae_source": record,
           "stats_from": _LATENT_STATS.value}
  for split, paths in splits.items():
    try:
      done = (sources.latents_vae(out_dir, split, name="latents") or {}).get("sha256") == record["sha256"]
    except FileNotFoundError:
      done = False
    if done:
      print(f"encode_latents: {split}: data set already written")
      continue
    # The split is swapped in whole (with its vae.json); the statistics follow once every split is in.
    sources.write_latent_dataset(out_dir, split, shard_examples(paths), vae=record)
  sources.write_latent_stats(out_dir, stats)
  print(f"encode_latents: wrote {sorted(splits)} to {out_dir} in {time.time() - t0:.0f}s; "
        f"shift {np.round(shift, 3).tolist()} scale {np.round(scale, 3).tolist()}", flush=True)


if __name__ == "__main__":
  config_lib.run(main, config=False)
