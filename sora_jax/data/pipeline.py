"""The packed token stream: latents (or raw Shapes frames) -> spacetime patches -> fixed-length rows.

Stages, in order (each a grain transformation, so the iterator state covers all of them):
  1. shuffle record indices with a seed (a new permutation every epoch; eval splits are not shuffled);
  2. shard per JAX process (process i takes global stream positions i, i + n, ...);
  3. load, sample z = mean + std * eps (or take the mean), normalise by latent_stats, size-fit, patchify;
  4. tokenize the caption, or (config.data.text_source = "features") take its cached frozen-encoder
     features [n, d] (data_pipelines/encode_text.py) padded with zeros to config.data.max_text_tokens,
     as Wan's pipeline pads UMT5's features to 512: the DiT then sees what it saw in pretraining and what
     sampling gives it;
  5. pack into rows of L video tokens / Lt text tokens / S segments with grain's best-fit (or first-fit)
     packer; segment ids are shared by a sample's video tokens, its text tokens and its `seg_*` entries;
  6. batch config.data.batch_size // process_count rows;
  7. prefetch with config.data.num_workers worker processes (0 = in-process).

Size fitting (NaViT-style, keeping aspect ratio): a sample whose patch count exceeds the per-sample token
budget (config.data.token_budget, 0 = the row length L) is first downscaled spatially by the smallest
integer factor s that divides its latent grid (in whole patches) and brings it within the budget, never
below config.data.min_patch_side patches on a side; latents are average-pooled s x s, a stand-in for
encoding a downscaled video. If even the smallest such grid is over budget the clip is long: with
long_clips="crop" it keeps its first latent frames (with a causal VAE these are exactly the latents of the
clip's first frames), with "drop" it is dropped. Crops (`seg_cropped`, latent frames cut), downscales
(`seg_scale`) and drops (`seg_dropped`: samples dropped just before this one) ride in every batch, so
nothing is lost silently; `python -m sora_jax.data.inspect` sums them.

Besides the contract keys (docs/architecture.md) a batch carries `seg_scale`, `seg_cropped`,
`seg_dropped` and `seg_index` (the source record index), all int32 [B, S].

Raw Shapes data (config.data.source = "shapes") stands in for latents without a VAE: frames in [-1, 1]
are average-pooled by config.data.stand_in_factors (frame 0 alone, then groups of ft frames, as a causal
VAE does), so the whole pipeline is testable before any VAE exists.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from sora_jax import config as config_lib
from sora_jax import patching

# Columns of the per-segment record `_seg` (one row per sample, packed to S rows).
_SEG_COLS = ("nt", "nh", "nw", "fps", "is_image", "valid", "scale", "cropped", "dropped", "index")
_C = {k: i for i, k in enumerate(_SEG_COLS)}
SOURCES = ("latents", "shapes")
TEXT_SOURCES = ("tokenizer", "features")
PACKERS = ("best_fit", "first_fit")
LONG_CLIPS = ("crop", "drop")


# ------------------------------------------------------------------------------------------ size fitting
@dataclasses.dataclass(frozen=True)
class Fit:
  """How one sample is fitted to the token budget: spatial pooling factor and latent frames kept."""
  scale: int          # latents average-pooled scale x scale
  keep_t: int         # latent frames kept (from the start); 0 = dropped
  tokens: int         # patch tokens after fitting

  @property
  def dropped(self) -> bool:
    return self.keep_t == 0


def fit_to_budget(latent_thw: Sequence[int], patch: Sequence[int], budget: int, *,
                  min_patch_side: int = 2, long_clips: str = "crop") -> Fit:
  """The smallest spatial downscale (then a crop in time, or a drop) that fits `budget` tokens."""
  if long_clips not in LONG_CLIPS:
    raise ValueError(f"long_clips {long_clips!r} is unknown; accepted: {list(LONG_CLIPS)}")
  t, h, w = (int(v) for v in latent_thw)
  pt, ph, pw = (int(p) for p in patch)
  if h % ph or w % pw or t < pt:
    raise ValueError(f"latent grid {(t, h, w)} does not hold whole patches {(pt, ph, pw)}")
  nt = t // pt  # a trailing partial time patch is cut (only when pt > 1)
  scales = [s for s in range(1, max(h, w) + 1)
            if h % (s * ph) == 0 and w % (s * pw) == 0
            and (s == 1 or min(h // (s * ph), w // (s * pw)) >= min_patch_side)]
  for s in scales:
    per_frame = (h // (s * ph)) * (w // (s * pw))
    if nt * per_frame <= budget:
      return Fit(scale=s, keep_t=nt * pt, tokens=nt * per_frame)
  s = scales[-1]  # over budget at every allowed size: keep the smallest grid, then cut time
  per_frame = (h // (s * ph)) * (w // (s * pw))
  keep_nt = budget // per_frame if long_clips == "crop" else 0
  return Fit(scale=s, keep_t=keep_nt * pt, tokens=keep_nt * per_frame)


def pool_space(latents_thwc: np.ndarray, scale: int) -> np.ndarray:
  if scale == 1:
    return latents_thwc
  t, h, w, c = latents_thwc.shape
  return latents_thwc.reshape(t, h // scale, scale, w // scale, scale, c).mean(axis=(2, 4))


def stand_in_latents(video_thw3: np.ndarray, factors: Sequence[int] = (4, 8, 8)) -> np.ndarray:
  """uint8 frames [T, H, W, 3] -> float32 [1 + (T-1)//ft, H/fh, W/fw, 3] by causal average pooling."""
  ft, fh, fw = (int(f) for f in factors)
  T, H, W, _ = video_thw3.shape
  if (T - 1) % ft or H % fh or W % fw:
    raise ValueError(f"video of shape {video_thw3.shape[:3]} does not fit stand-in factors "
                     f"{(ft, fh, fw)}: need T = 1 + {ft}k and H, W multiples of {fh}, {fw}")
  x = video_thw3.astype(np.float32) / 127.5 - 1.0
  x = x.reshape(T, H // fh, fh, W // fw, fw, 3).mean(axis=(2, 4))
  rest = x[1:].reshape((T - 1) // ft, ft, H // fh, W // fw, 3).mean(axis=1)
  return np.concatenate([x[:1], rest], axis=0)


# --------------------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything the per-sample and per-row stages need, resolved from config.data (picklable)."""
  source: str
  patch: tuple[int, int, int]   # config.dit.patch: the DiT's tokens are these spacetime patches
  seq_len: int
  text_len: int
  max_segments: int
  max_text_tokens: int
  token_budget: int
  min_patch_side: int
  long_clips: str
  sample_latents: bool
  stand_in_factors: tuple[int, int, int]
  text_features: bool   # cached encoder features (text_features.py) instead of caption ids
  shift: tuple[float, ...]
  scale: tuple[float, ...]
  seed: int

  @property
  def channels(self) -> int:
    return len(self.shift)

  @property
  def token_dim(self) -> int:
    return patching.token_dim(self.channels, self.patch)


def _data_dir(config, key: str, workdir: str | None, default_name: str) -> Path:
  value = config_lib.complete(config).data[key]
  if value:
    return Path(value)
  if workdir is None:
    raise ValueError(f"config.data.{key} is empty and no workdir was given to resolve "
                     f"<workdir>/../data/{default_name}; set --config.data.{key}")
  return Path(workdir).parent / "data" / default_name


def latent_stats(config, *, workdir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(shift [c], scale [c]) of the configured source; models see (z - shift) / scale.

  For the raw "shapes" source the stand-in latents are already in [-1, 1]: shift 0, scale 1, c = 3.
  """
  source = config_lib.complete(config).data.source
  if source == "shapes":
    shift, scale = np.zeros(3, np.float32), np.ones(3, np.float32)
  elif source == "latents":
    from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
    stats = sources.read_latent_stats(_data_dir(config, "latents_dir", workdir, "latents"))
    shift = np.asarray(stats["shift"], np.float32)
    scale = np.asarray(stats["scale"], np.float32)
  else:
    raise ValueError(f"config.data.source {source!r} is unknown; accepted: {list(SOURCES)}")
  return shift, scale


def latents_vae(config, *, workdir: str | None = None) -> dict | None:
  """The VAE record ({"path", "step", "sha256"}) of the configured latents' statistics; None for the
  raw "shapes" source or statistics that carry none."""
  if config_lib.complete(config).data.source != "latents":
    return None
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.read_latent_stats(_data_dir(config, "latents_dir", workdir, "latents")).get("vae_source")


def make_spec(config, *, workdir: str | None = None, seed: int | None = None,
              stats: tuple[np.ndarray, np.ndarray] | None = None) -> Spec:
  """The resolved stream spec; `stats` = (shift, scale) overrides latent_stats (in-memory sources)."""
  d = config_lib.complete(config).data
  shift, scale = latent_stats(config, workdir=workdir) if stats is None else stats
  budget = int(d.token_budget) or int(d.seq_len)
  if budget > d.seq_len:
    raise ValueError(f"config.data.token_budget {budget} exceeds seq_len {d.seq_len}: a sample must fit a row")
  if d.packer not in PACKERS:
    raise ValueError(f"config.data.packer {d.packer!r} is unknown; accepted: {list(PACKERS)}")
  if d.long_clips not in LONG_CLIPS:
    raise ValueError(f"config.data.long_clips {d.long_clips!r} is unknown; accepted: {list(LONG_CLIPS)}")
  if d.text_source not in TEXT_SOURCES:
    raise ValueError(f"config.data.text_source {d.text_source!r} is unknown; accepted: {list(TEXT_SOURCES)}")
  if d.text_source == "features" and int(d.text_len) < int(d.max_text_tokens):
    raise ValueError(f"config.data.text_len {d.text_len} < max_text_tokens {d.max_text_tokens}: every "
                     "caption's padded features must fit a row")
  return Spec(
      source=d.source, patch=tuple(int(p) for p in config.dit.patch),
      seq_len=int(d.seq_len), text_len=int(d.text_len), max_segments=int(d.max_segments),
      max_text_tokens=int(d.max_text_tokens), token_budget=budget,
      min_patch_side=int(d.min_patch_side), long_clips=d.long_clips,
      sample_latents=bool(d.sample_latents),
      stand_in_factors=tuple(int(f) for f in d.stand_in_factors),
      text_features=d.text_source == "features",
      shift=tuple(float(v) for v in shift), scale=tuple(float(v) for v in scale),
      seed=int(d.shuffle_seed if seed is None else seed))


# ------------------------------------------------------------------------------------ per-sample stage
class PrepareSample:
  """(stream position g, record index i) -> one packable element, or a drop marker.

  Elements hold `_video` float32 [n, D + 4] (tokens, then positions t, h, w, then the loss mask),
  `text_tokens` int32 [m] (or cached features float32 [max_text_tokens, d]) and `_seg` float64
  [1, len(_SEG_COLS)]; fusing features keeps the packer's
  per-feature bookkeeping small. z's noise comes from (seed, record, epoch), so a resumed or re-sharded
  run draws the same latents for the same sample.
  """

  def __init__(self, spec: Spec, source, tokenize: Callable[[str], np.ndarray], num_records: int):
    self.spec = spec
    self.source = source
    self.tokenize = tokenize
    self.num_records = num_records

  def latents(self, record: Mapping[str, Any], index: int, epoch: int) -> np.ndarray:
    spec = self.spec
    if spec.source == "shapes":
      return stand_in_latents(np.asarray(record["video"]), spec.stand_in_factors)
    mean = np.asarray(record["latent_mean"], np.float32)
    if not spec.sample_latents:
      z = mean
    else:
      rng = np.random.default_rng([spec.seed, index, epoch])
      z = mean + np.asarray(record["latent_std"], np.float32) * rng.standard_normal(
          mean.shape, dtype=np.float32)
    return (z - np.asarray(spec.shift, np.float32)) / np.asarray(spec.scale, np.float32)

  def __call__(self, gi: tuple[int, int]) -> dict:
    g, index = (int(v) for v in gi)
    spec = self.spec
    record = self.source[index]
    z = self.latents(record, index, g // self.num_records)
    fit = fit_to_budget(z.shape[:3], spec.patch, spec.token_budget,
                        min_patch_side=spec.min_patch_side, long_clips=spec.long_clips)
    if fit.dropped:
      return {"_drop": np.ones((), np.int32)}
    latent_t = z.shape[0]
    z = pool_space(z[:fit.keep_t], fit.scale)
    tokens_nd, positions_n3 = patching.patchify(z, spec.patch)
    n = tokens_nd.shape[0]
    video = np.concatenate([tokens_nd.astype(np.float32), positions_n3.astype(np.float32),
                            np.ones((n, 1), np.float32)], axis=1)
    if spec.text_features:
      from sora_jax.data import text_features  # pylint: disable=g-import-not-at-top
      text = text_features.pad(record["text_features"], spec.max_text_tokens)
    else:
      text = np.asarray(self.tokenize(record["caption"]), np.int32)[:spec.max_text_tokens]
    seg = np.zeros((1, len(_SEG_COLS)), np.float64)
    seg[0, [_C["nt"], _C["nh"], _C["nw"]]] = patching.patch_grid(z.shape, spec.patch)
    seg[0, _C["fps"]] = float(record.get("fps", 0.0))
    seg[0, _C["is_image"]] = float(latent_t == 1)
    seg[0, _C["valid"]] = 1.0
    seg[0, _C["scale"]] = fit.scale
    seg[0, _C["cropped"]] = latent_t - fit.keep_t
    seg[0, _C["index"]] = index
    return {"_video": video, "text_tokens": text, "_seg": seg}


# ----------------------------------------------------------------------------------------- drop counting
class CountDrops(grain.IterDataset):
  """Removes drop markers and charges their count to the next kept sample's `_seg` "dropped" column.

  The pending count is part of the iterator state, so a restored iterator reports the same drops.
  (Drops after the last kept sample of a finite split have no sample to ride on and go unreported.)
  `limit` drops in a row (a whole epoch's worth) mean that no sample fits the budget: an endless stream
  would wait forever for a kept one, so that raises instead.
  """

  def __init__(self, parent: grain.IterDataset, *, limit: int, spec: Spec):
    super().__init__(parent)
    self._limit, self._spec = limit, spec

  def __iter__(self) -> grain.DatasetIterator:
    return _CountDropsIterator(self._parent.__iter__(), self._limit, self._spec)


class _CountDropsIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, limit: int, spec: Spec):
    super().__init__(parent)
    self._pending = 0
    self._limit, self._spec = limit, spec

  def __next__(self) -> dict:
    while True:
      element = next(self._parent)
      if "_drop" in element:
        self._pending += 1
        if self._pending >= self._limit:
          from sora_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
          raise ConfigError(
              f"all of the last {self._pending} samples were dropped: none fits config.data."
              f"token_budget={self._spec.token_budget} tokens (seq_len {self._spec.seq_len}, "
              f"long_clips={self._spec.long_clips!r}); raise the budget or use long_clips='crop'")
        continue
      element["_seg"][0, _C["dropped"]] = self._pending
      self._pending = 0
      return element

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "pending": self._pending}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._pending = int(state["pending"])


# ------------------------------------------------------------------------------------------ row stage
class UnfuseRow:
  """A packed row of fused features -> the contract keys of docs/architecture.md (one row, no B)."""

  def __init__(self, token_dim: int):
    self.token_dim = token_dim

  def __call__(self, row: dict) -> dict:
    D = self.token_dim
    video, seg = row["_video"], row["_seg"]
    col = lambda k, dtype: seg[:, _C[k]].astype(dtype)
    return {
        "tokens": np.ascontiguousarray(video[:, :D], np.float32),
        "positions": video[:, D:D + 3].astype(np.int32),
        "segment_ids": row["_video_segment_ids"].astype(np.int32),
        "loss_mask": np.ascontiguousarray(video[:, D + 3], np.float32),
        # Caption ids, or a frozen encoder's features (float, [Lt, d]).
        "text_tokens": (row["text_tokens"] if row["text_tokens"].dtype.kind == "f"
                        else row["text_tokens"].astype(np.int32)),
        "text_segment_ids": row["text_tokens_segment_ids"].astype(np.int32),
        "seg_grid": seg[:, [_C["nt"], _C["nh"], _C["nw"]]].astype(np.int32),
        "seg_fps": col("fps", np.float32),
        "seg_is_image": col("is_image", np.int32),
        "seg_valid": col("valid", np.int32),
        "seg_scale": col("scale", np.int32),
        "seg_cropped": col("cropped", np.int32),
        "seg_dropped": col("dropped", np.int32),
        "seg_index": col("index", np.int32),
    }


class PadBatch:
  """Pads a short final batch of a finite split with empty rows (all segment ids 0) to `rows`."""

  def __init__(self, rows: int):
    self.rows = rows

  def __call__(self, batch: dict) -> dict:
    short = self.rows - next(iter(batch.values())).shape[0]
    if short <= 0:
      return batch
    return {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------- the pipeline
def open_source(config, split: str, *, workdir: str | None = None):
  """The random-access record source of config.data.source for `split`."""
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = config_lib.complete(config).data.source
  if source == "latents":
    latents_dir = _data_dir(config, "latents_dir", workdir, "latents")
    sources.check_latents(latents_dir, split)  # encoded by the VAE its statistics come from
    if config.data.text_source == "features":
      from sora_jax.data import text_features  # pylint: disable=g-import-not-at-top
      return text_features.with_text_features(latents_dir, split)
    return sources.latent_source(latents_dir, split)
  if source == "shapes":
    return sources.video_source(_data_dir(config, "videos_dir", workdir, "shapes"), split)
  raise ValueError(f"config.data.source {source!r} is unknown; accepted: {list(SOURCES)}")


def open_tokenizer(config, *, workdir: str | None = None) -> Callable[[str], np.ndarray]:
  """caption -> int32 ids (pieces + EOS, at most config.data.max_text_tokens), picklable for workers."""
  from sora_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  tok = tokenizer.Tokenizer(str(_data_dir(config, "tokenizer", workdir, "tokenizer.model")))
  return functools.partial(tok.encode, max_len=int(config.data.max_text_tokens))


def make_dataset(config, *, split: str = "train", seed: int | None = None, source=None,
                 tokenize: Callable[[str], np.ndarray] | None = None, workdir: str | None = None,
                 stats: tuple[np.ndarray, np.ndarray] | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """The packed, batched grain IterDataset of one process (see the module docstring for the stages).

  `source` (len / getitem of records), `tokenize` and `stats` (shift, scale) default to the configured
  data set, tokenizer and latent_stats. `num_epochs` defaults to endless for train and one pass for
  other splits.
  """
  import jax  # pylint: disable=g-import-not-at-top
  spec = make_spec(config, workdir=workdir, seed=seed, stats=stats)
  source = open_source(config, split, workdir=workdir) if source is None else source
  if tokenize is None and not spec.text_features:  # cached features need no tokenizer
    tokenize = open_tokenizer(config, workdir=workdir)
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  d = config.data
  if d.batch_size % pc:
    raise ValueError(f"config.data.batch_size {d.batch_size} is not divisible by {pc} processes")
  train = split == "train"
  num_epochs = (None if train else 1) if num_epochs is None else num_epochs
  n = len(source)
  if n == 0:
    raise ValueError(f"the {split!r} source {source!r} has no records")

  # 1-2. A global shuffled stream of record indices (one permutation per epoch), then this process's
  # positions of it; (g, i) keeps the global position g, from which the epoch of the sample follows.
  ds = grain.MapDataset.range(n)
  if train:
    ds = ds.shuffle(seed=spec.seed)
  ds = ds.repeat(num_epochs).map_with_index(_with_position)[pi::pc]
  # 3-4. Decode, sample, fit, patchify, tokenize.
  ds = ds.map(PrepareSample(spec, source, tokenize, n))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(d.read_threads),
                                            prefetch_buffer_size=16))
  # 2n of this process's positions in a row span a whole epoch: every record was tried and dropped.
  ds = CountDrops(ds, limit=2 * n, spec=spec)
  # 5. Pack: every feature in length_struct caps the row, so a row closes when its video tokens, its
  # text tokens or its S segment slots run out.
  packer = {"best_fit": grain.experimental.BestFitPackIterDataset,
            "first_fit": grain.experimental.FirstFitPackIterDataset}[d.packer]
  ds = packer(ds, length_struct={"_video": spec.seq_len, "text_tokens": spec.text_len,
                                 "_seg": spec.max_segments},
              num_packing_bins=int(d.packing_bins), seed=spec.seed,
              shuffle_bins=train, max_sequences_per_bin=spec.max_segments)
  ds = ds.map(UnfuseRow(spec.token_dim))
  # 6. Batch this process's rows; a finite split's last batch is padded with empty rows.
  rows = d.batch_size // pc
  ds = ds.batch(rows, drop_remainder=False)
  if not train or num_epochs is not None:
    ds = ds.map(PadBatch(rows))
  # 7. Worker processes.
  if int(d.num_workers) > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.num_workers)))
  return ds


def _with_position(g: int, i: int) -> tuple[int, int]:
  return g, i


def make_iterator(config, *, split: str = "train", seed: int | None = None,
                  workdir: str | None = None, **kwargs) -> grain.DatasetIterator:
  """An iterator of host-local numpy batch dicts ([config.data.batch_size // process_count, ...]) with
  get_state()/set_state() (grain DatasetIterator; orbax's grain checkpoint handlers accept it).
  Extra keyword arguments go to `make_dataset`."""
  return iter(make_dataset(config, split=split, seed=seed, workdir=workdir, **kwargs))


def to_global(batch: Mapping[str, np.ndarray], mesh) -> dict:
  """Host-local batch -> global jax.Arrays with the leading axis sharded over the mesh's batch axes."""
  import jax  # pylint: disable=g-import-not-at-top
  from sora_jax import sharding  # pylint: disable=g-import-not-at-top
  out = {}
  for k, x in batch.items():
    x = np.asarray(x)
    spec = sharding.logical_to_spec(("act_batch",) + (None,) * (x.ndim - 1), mesh)
    out[k] = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), x)
  return out
