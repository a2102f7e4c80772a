"""Cached caption features of a frozen text encoder (Wan 2.1's UMT5), stored beside a latent data set.

A DiT that reads a frozen encoder's features (`dit.text_encoder = "umt5"`) would otherwise run the 5.7B
encoder on every caption of every step. `data_pipelines/encode_text.py` runs it once per caption and
writes a data set whose record i holds the features of latent record i's caption:

    L/latents/<split>/1.0.0/                       latent_mean, latent_std, caption, ...  (encode_latents.py)
    L/text_features/umt5/<split>/1.0.0/            text_features float32 [n, d], caption  (encode_text.py)

`n` is the caption's token count (pieces + EOS, at most the encoder's max_len): the zeros that Wan's
pipeline pads every caption to 512 tokens with are not stored; the packing pipeline adds them
(sora_jax/data/pipeline.py, `data.text_source = "features"`), so the DiT sees in training exactly what
`sampling.Pipeline.text` gives it at inference. `with_text_features(latents, features)` joins the two
by record index and checks that the captions agree, so a latent data set rebuilt after its features
were cached fails loudly instead of pairing videos with the wrong captions.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from sora_jax.data import sources

SUBDIR = "text_features"
NAME = "umt5"
KEYS = ("text_features", "caption")


def features_dir(latents_dir: str | os.PathLike) -> Path:
  """Where a latent data set's cached caption features live (a tfds data dir)."""
  return Path(latents_dir) / SUBDIR


def _features(dim: int):
  tfds = sources._tfds()  # pylint: disable=protected-access
  return tfds.features.FeaturesDict({
      "text_features": tfds.features.Tensor(shape=(None, dim), dtype=np.float32,
                                            encoding=tfds.features.Encoding.BYTES,
                                            doc="the encoder's last hidden states [n, d] of the caption's n tokens"),
      "caption": tfds.features.Text(doc="the caption, as in the latent record"),
  })


def write(latents_dir: str | os.PathLike, split: str, examples: Iterable[Mapping[str, Any]], *,
          dim: int) -> Path:
  """Writes the features of one split (records in the latent data set's order)."""
  return sources.write_dataset(features_dir(latents_dir), name=NAME, split=split, features=_features(dim),
                               examples=({k: ex[k] for k in KEYS} for ex in examples),
                               description="frozen text encoder features per caption")


def source(latents_dir: str | os.PathLike, split: str) -> sources.RecordSource:
  """Reader of a split's cached features: records {text_features [n, d], caption}."""
  return sources.RecordSource(features_dir(latents_dir), split, name=NAME, keys=KEYS)


class WithTextFeatures:
  """A latent source whose records also hold `text_features`, from the cached data set (random access,
  picklable, for grain workers)."""

  def __init__(self, latents, features):
    if len(latents) != len(features):
      raise ValueError(f"{features!r} has {len(features)} records, the latent data set {latents!r} has "
                       f"{len(latents)}; re-run data_pipelines/encode_text.py on this latent data set")
    self.latents, self.features = latents, features

  def __len__(self) -> int:
    return len(self.latents)

  def __getitem__(self, index: int) -> dict:
    record, cached = dict(self.latents[index]), self.features[index]
    if cached["caption"] != record["caption"]:
      raise ValueError(f"record {index}: cached features are of caption {cached['caption'][:60]!r}, the latent "
                       f"record's caption is {record['caption'][:60]!r}; re-run data_pipelines/encode_text.py")
    record["text_features"] = cached["text_features"]
    return record

  def __repr__(self) -> str:
    return f"WithTextFeatures({self.latents!r}, {self.features!r})"


def with_text_features(latents_dir: str | os.PathLike, split: str):
  """The latent source of `split` joined with its cached caption features."""
  return WithTextFeatures(sources.latent_source(latents_dir, split), source(latents_dir, split))


def pad(features_nd: np.ndarray, length: int) -> np.ndarray:
  """[n, d] -> [length, d]: cut to `length` tokens, then zeros (Wan's padding of every caption)."""
  f = np.asarray(features_nd, np.float32)[:length]
  out = np.zeros((length, f.shape[1]), np.float32)
  out[:len(f)] = f
  return out


# ------------------------------------------------------------------------------------------- encoding
def caption_ids(tokenize: Callable[[str, int], np.ndarray], caption: str, max_len: int) -> np.ndarray:
  """Ids of `caption` as Wan's pipeline (and `sampling.Pipeline.text`) feeds UMT5: the cleaned prompt,
  pieces + EOS, at most max_len."""
  from sora_jax.data.tokenizer import clean_wan_prompt  # pylint: disable=g-import-not-at-top
  return np.asarray(tokenize(clean_wan_prompt(caption), max_len), np.int32)


class Encoder:
  """Runs a frozen encoder over batches of captions, each alone in a row padded to max_len (the layout
  `sampling` uses for one caption): `encode(list of ids) -> list of float32 [n, d]`.

  The parameters are sharded over `devices` (FSDP by logical names, as the trainer shards models), so an
  encoder larger than one chip runs; captions are replicated and the batch is padded to `batch` rows,
  so one program serves every call.
  """

  def __init__(self, encoder, *, max_len: int, batch: int, devices: Sequence | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from sora_jax import sharding  # pylint: disable=g-import-not-at-top
    devices = list(devices if devices is not None else jax.local_devices())
    self.mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    graphdef, state = nnx.split(encoder)
    shardings = sharding.state_shardings(state, self.mesh)
    state = jax.device_put(nnx.to_pure_dict(state), shardings)
    rep = sharding.replicated(self.mesh)
    run = lambda st, ids, seg: nnx.merge(graphdef, st)(ids, seg)
    self._run = jax.jit(run, in_shardings=(shardings, rep, rep), out_shardings=rep)
    self.state, self.max_len, self.batch = state, int(max_len), int(batch)

  def encode(self, ids_list: Sequence[np.ndarray]) -> list[np.ndarray]:
    import jax  # pylint: disable=g-import-not-at-top
    out = []
    for start in range(0, len(ids_list), self.batch):
      part = ids_list[start:start + self.batch]
      ids = np.zeros((self.batch, self.max_len), np.int32)
      seg = np.zeros((self.batch, self.max_len), np.int32)
      for r, x in enumerate(part):
        if not 0 < len(x) <= self.max_len:
          raise ValueError(f"a caption of {len(x)} ids; accepted: 1 to max_len={self.max_len}")
        ids[r, :len(x)], seg[r, :len(x)] = x, 1
      # Blocked per call: with several (fake CPU) devices an unblocked loop of collectives can deadlock.
      feats = np.asarray(jax.block_until_ready(self._run(self.state, ids, seg)), np.float32)
      out.extend(feats[r, :len(x)].copy() for r, x in enumerate(part))
    return out
