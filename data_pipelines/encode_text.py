"""Caches a frozen text encoder's caption features beside a latent data set, so training never runs it.

    python data_pipelines/encode_text.py --bundle runs/wan21_1.3b/bundle --latents_dir L \
        [--splits train,validation,test] [--shard_size 256] [--batch 8]

For each latent record (data_pipelines/encode_latents.py) the bundle's encoder (Wan 2.1's UMT5, converted
by sora_jax.convert.wan) reads the caption as Wan's pipeline does (cleaned, pieces + EOS, at most 512
ids) and its last hidden states [n, d] of the n tokens are stored in
L/text_features/umt5/<split>/ (record i for latent record i; sora_jax/data/text_features.py). Training
with `data.text_source = "features"` pads them to 512 with zeros, as Wan's DiT saw in training and as
sampling gives it.

The encoder runs once per distinct caption of a shard (clips cut from one video share a caption and sit
next to each other), its parameters sharded over this host's devices. Like encode_latents.py, work is cut
into shards written atomically to L/_text_shards/<split>/ and skipped on a re-run; each process of a
multi-host launch takes the shards k with k % process_count == process_index; process 0 writes the data
sets when every shard exists. Only the bundle's text encoder and tokenizer are read.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from absl import app, flags
import numpy as np

from sora_jax import distributed  # defines --coordinator/--num_processes/--process_id
from sora_jax.data import shards

_BUNDLE = flags.DEFINE_string("bundle", None, "a bundle with a frozen text encoder (convert.wan's)")
_LATENTS_DIR = flags.DEFINE_string("latents_dir", None, "the latent data set (encode_latents.py --out_dir)")
_SPLITS = flags.DEFINE_list("splits", ["train", "validation", "test"], "splits to encode (missing splits "
                            "other than train are skipped with a note)")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 256, "records per resumable shard")
_BATCH = flags.DEFINE_integer("batch", 8, "captions per encoder call")


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def encode_shard(encoder, tokenize, max_len: int, src, indices, path: Path) -> int:
  """Features of records `indices`' captions, one encoder run per distinct caption, written atomically.
  Returns how many captions were encoded."""
  from sora_jax.data import text_features  # pylint: disable=g-import-not-at-top
  captions = [src[i]["caption"] for i in indices]
  distinct = sorted(set(captions))
  feats = dict(zip(distinct, encoder.encode([text_features.caption_ids(tokenize, c, max_len)
                                             for c in distinct])))
  arrays = {f"f_{j}": feats[c] for j, c in enumerate(captions)}
  arrays["captions"] = np.asarray(json.dumps(captions))
  shards.write_npz(path, arrays)
  return len(distinct)


def shard_examples(paths: list[Path]):
  for p in paths:
    with np.load(p) as z:
      for j, caption in enumerate(json.loads(str(z["captions"]))):
        yield {"text_features": z[f"f_{j}"], "caption": caption}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.data import sources, text_features  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.WARNING)
  distributed.initialize()
  for name, flag in (("--bundle", _BUNDLE), ("--latents_dir", _LATENTS_DIR)):
    if not flag.value:
      _fail(f"{name} is required")
  if _SHARD_SIZE.value < 1 or _BATCH.value < 1:
    _fail(f"--shard_size={_SHARD_SIZE.value} and --batch={_BATCH.value}: both must be >= 1")
  out_dir = Path(_LATENTS_DIR.value)
  try:
    # Built in host memory, then sharded over the chips by text_features.Encoder: UMT5-XXL in float32
    # (23 GB) need never sit whole on one chip.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      cfg, model, tok = bundle_lib.load_text_encoder(_BUNDLE.value)
  except (bundle_lib.BundleError, FileNotFoundError) as e:
    _fail(str(e).splitlines()[0])
  max_len = int(cfg.text.max_len)
  encoder = text_features.Encoder(model, max_len=max_len, batch=_BATCH.value)
  del model
  tokenize = tok.encode
  pid, nproc = jax.process_index(), jax.process_count()

  t0 = time.time()
  splits = shards.encode_splits(
      "encode_text", _SPLITS.value, lambda split: sources.latent_source(out_dir, split),
      out_dir / "_text_shards", _SHARD_SIZE.value,
      lambda src, idx, path: encode_shard(encoder, tokenize, max_len, src, idx, path), unit="records",
      summary="{split}: {n} records, {encoded} captions encoded by this run", source=f"--latents_dir {out_dir}",
      fail=_fail)
  if nproc > 1:
    multihost_utils.sync_global_devices("encode_text shards")
  if pid != 0:
    return
  dim = int(cfg.text.d_model)
  for split, paths in splits.items():
    text_features.write(out_dir, split, shard_examples(paths), dim=dim)
  print(f"encode_text: wrote {sorted(splits)} to {text_features.features_dir(out_dir)} in "
        f"{time.time() - t0:.0f}s ({cfg.text.encoder}, d={dim}, max_len={max_len})", flush=True)


if __name__ == "__main__":
  app.run(main)
