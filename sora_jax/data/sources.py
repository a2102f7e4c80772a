"""Video and latent data sets on disk: the tfds/ArrayRecord writer and the random-access readers.

Every data set of the project (rendered Shapes, ingested videos, encoded latents) is a
tensorflow-datasets data set in ArrayRecord format, written and read without TensorFlow:

    write_dataset(data_dir, name="shapes", split="train", features=video_features(), examples=it)
    src = video_source(data_dir, "train")     # len(src), src[i] -> dict of numpy arrays / str / int
    lat = latent_source(latents_dir, "train") # records of data_pipelines/encode_latents.py

Each split is its own builder config, so the splits of one data set are built by separate commands
into `data_dir/<name>/<split>/<version>/` and read back with `tfds.builder_from_directory` (no builder
class needs importing). Records are written in example order (`disable_shuffling`), so record i of a
Shapes split is `shapes.sample_spec(split, i, ...)` and two builds with the same inputs are
byte-identical. A split is built beside the old one (in `data_dir/<name>/<split>/.incoming`) and
swapped in only when complete (sora_jax/atomic.py): an interrupted, failed or empty rebuild leaves the
previous split as it was, and never a partial one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from sora_jax import atomic

VERSION = "1.0.0"
VIDEO_KEYS = ("video", "caption", "num_frames", "height", "width", "fps", "labels", "source")
LATENT_KEYS = ("latent_mean", "latent_std", "caption", "num_frames", "height", "width", "fps",
               "labels", "source")
LATENT_STATS = "latent_stats.json"
LATENTS_VAE = "vae.json"  # inside a latent split's version directory: the VAE that encoded it
STAGING = ".incoming"  # beside the split's version directories: where a rebuild is written
_VERSION_DIR = re.compile(r"\d+\.\d+\.\d+")


def _tfds():
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # pipelines print their own progress
  return tfds


def _common_features(tfds) -> dict:
  return {
      "caption": tfds.features.Text(doc="the text prompt"),
      "num_frames": tfds.features.Scalar(np.int32, doc="T: 1 (an image) or 1 + 4k"),
      "height": tfds.features.Scalar(np.int32, doc="pixel height H"),
      "width": tfds.features.Scalar(np.int32, doc="pixel width W"),
      "fps": tfds.features.Scalar(np.float32, doc="frames per second"),
      "labels": tfds.features.Text(doc="Shapes: ClipSpec JSON; ingested videos: empty"),
      "source": tfds.features.Text(doc="where the example came from (split/index or file#clip)"),
  }


def video_features():
  """Features of a video data set: `video` uint8 [T, H, W, 3] plus the common scalars.

  Tensors are stored as raw bytes: ArrayRecord already compresses every record, so tfds' ZLIB
  encoding would compress twice; it made a build 7x slower for a 5% smaller file.
  """
  tfds = _tfds()
  return tfds.features.FeaturesDict({
      "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.BYTES, doc="frames [T, H, W, 3]"),
      **_common_features(tfds)})


def latent_features():
  """Features of a latent data set: VAE posterior `latent_mean`/`latent_std` float32 [t, h, w, c]
  (unnormalised) plus the common scalars of the video they encode (num_frames/height/width in pixels)."""
  tfds = _tfds()
  tensor = lambda doc: tfds.features.Tensor(shape=(None, None, None, None), dtype=np.float32,
                                            encoding=tfds.features.Encoding.BYTES, doc=doc)
  return tfds.features.FeaturesDict({
      "latent_mean": tensor("posterior mean [t, h, w, c]"),
      "latent_std": tensor("posterior std [t, h, w, c]"),
      **_common_features(tfds)})


def write_dataset(data_dir: str | os.PathLike, *, name: str, split: str, features,
                  examples: Iterable[Mapping[str, Any]], description: str = "",
                  overwrite: bool = True, extra_files: Mapping[str, str] | None = None) -> Path:
  """Writes `examples` (dicts matching `features`, in order) as split `split` of data set `name`.

  Returns the data set directory `data_dir/name/split/VERSION`. An existing build of the same split
  is replaced when `overwrite` (only once the new one is complete), else this raises. `extra_files`
  ({file name: text}) are written into that directory as part of the build: swapped in with it, so they
  always describe the records beside them.
  """
  tfds = _tfds()
  if not name.isidentifier() or not split.isidentifier():
    raise ValueError(f"data set name {name!r} and split {split!r} must be identifiers")
  out = Path(data_dir) / name / split / VERSION
  atomic.recover_dir(out)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True to rebuild it")
  # tfds builds under its own data_dir layout: stage one of those beside `out`, on its file system.
  staging = out.parent / STAGING
  shutil.rmtree(staging, ignore_errors=True)  # a killed earlier build's leftovers
  examples_iter = iter(examples)

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=split)]
    # tfds looks for a checksums file next to the builder's code, through `importlib_resources`,
    # which is not installed (nor needed): there is nothing to download.
    code_path = None

    def _info(self):
      return self.dataset_info_from_configs(description=description, features=features,
                                            disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples()}

    def _log_download_bytes(self):  # "Downloading and preparing ...": nothing is downloaded
      pass

    def _log_download_done(self):  # the calling pipeline prints its own one-line summary
      pass

    def _generate_examples(self):
      for i, ex in enumerate(examples_iter):
        yield i, dict(ex)

  _Builder.name = name
  try:
    builder = _Builder(data_dir=str(staging), config=split, file_format="array_record")
    with _deterministic_serialization(), tempfile.TemporaryDirectory() as downloads:
      # Nothing is downloaded, but tfds creates a download dir: keep it out of data_dir.
      # try_download_gcs=False: never look for a prebuilt copy on the network.
      builder.download_and_prepare(
          download_dir=downloads,
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    for file_name, text in (extra_files or {}).items():
      (staging / name / split / VERSION / file_name).write_text(text)
    atomic.replace_dir(staging / name / split / VERSION, out)
  finally:
    remove_incomplete(data_dir, name, split)
  return out


def remove_incomplete(data_dir: str | os.PathLike, name: str, split: str) -> None:
  """Removes what a failed `write_dataset` of this split left behind (never a finished build)."""
  split_dir = Path(data_dir) / name / split
  shutil.rmtree(split_dir / STAGING, ignore_errors=True)
  for p in split_dir.glob("*incomplete*"):
    shutil.rmtree(p, ignore_errors=True)
  if split_dir.is_dir() and not any(split_dir.iterdir()):
    split_dir.rmdir()


@contextlib.contextmanager
def _deterministic_serialization():
  """tfds serialises each record as a tf.train.Example, whose feature map protobuf writes in a
  per-process hash order: two identical builds would differ byte for byte. Deterministic
  serialisation sorts the map, for the duration of one build."""
  from tensorflow_datasets.core import example_serializer
  cls = example_serializer.ExampleSerializer
  original = cls.serialize_example

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  cls.serialize_example = serialize_example
  try:
    yield
  finally:
    cls.serialize_example = original


def find_dataset_dir(data_dir: str | os.PathLike, split: str, name: str | None = None) -> Path:
  """The directory of split `split` under `data_dir` (a tfds data dir, or the data set dir itself)."""
  root = Path(data_dir)
  if (root / "dataset_info.json").is_file():
    return root
  pattern = f"{name or '*'}/{split}/*/dataset_info.json"
  # Only version directories: not a rebuild being staged, nor an old build being swapped out.
  found = sorted((p.parent for p in root.glob(pattern) if _VERSION_DIR.fullmatch(p.parent.name)),
                 key=lambda p: tuple(int(v) for v in p.name.split(".")))
  if not found:
    raise FileNotFoundError(f"no built split {split!r} under {root} (looked for {pattern}); "
                            "build it with data_pipelines/build_shapes.py or ingest_videos.py")
  names = sorted({p.parent.parent.name for p in found})
  if len(names) > 1:
    raise ValueError(f"{root} holds split {split!r} of several data sets {names}; pass name=")
  return found[-1]  # highest version


class RecordSource:
  """Random-access, picklable reader of one split: `len(src)`, `src[i]` -> dict with numpy arrays,
  `str` captions/labels/sources, `int` num_frames/height/width and `float` fps."""

  def __init__(self, data_dir: str | os.PathLike, split: str, *, name: str | None = None,
               keys: tuple[str, ...] = VIDEO_KEYS):
    self.path = find_dataset_dir(data_dir, split, name)
    self.split = split
    self.keys = keys
    self._source = None
    missing = set(keys) - set(self.feature_names())
    if missing:
      raise ValueError(f"{self.path} lacks features {sorted(missing)}; it has {self.feature_names()}")

  def feature_names(self) -> list[str]:
    info = json.loads((self.path / "features.json").read_text())
    return sorted(info["featuresDict"]["features"])

  def _src(self):
    if self._source is None:
      tfds = _tfds()
      builder = tfds.builder_from_directory(str(self.path))
      self._source = builder.as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    return len(self._src())

  def __getitem__(self, index: int) -> dict:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {n} records of {self.path}")
    rec = self._src()[int(index) % n]
    return {k: _pythonic(k, rec[k]) for k in self.keys}

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

  def __repr__(self) -> str:
    return f"RecordSource({str(self.path)!r}, {len(self)} records)"


def _pythonic(key: str, value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if key in ("num_frames", "height", "width"):
    return int(value)
  if key == "fps":
    return float(value)
  return value


def video_source(data_dir: str | os.PathLike, split: str, *, name: str | None = None) -> RecordSource:
  """Reader of a video data set's split: records with `video` uint8 [T, H, W, 3], `caption`,
  `num_frames`, `height`, `width`, `fps`, `labels` (Shapes: `ClipSpec.from_json`), `source`."""
  return RecordSource(data_dir, split, name=name, keys=VIDEO_KEYS)


def latent_source(latents_dir: str | os.PathLike, split: str, *, name: str | None = None
                  ) -> RecordSource:
  """Reader of a latent data set's split: records with `latent_mean`, `latent_std` float32
  [t, h, w, c] and the common scalars of the video they encode."""
  return RecordSource(latents_dir, split, name=name, keys=LATENT_KEYS)


def write_latent_dataset(latents_dir: str | os.PathLike, split: str,
                         examples: Iterable[Mapping[str, Any]], *, stats: Mapping | None = None,
                         name: str = "latents", vae: Mapping | None = None) -> Path:
  """Writes a latent data set split (for data_pipelines/encode_latents.py).

  Each example needs LATENT_KEYS: `latent_mean`/`latent_std` float32 [t, h, w, c], and `caption`,
  `num_frames`, `height`, `width`, `fps`, `labels`, `source` copied from its video record (a video
  record minus `video` plus the two latents). `stats` ({"shift": [c], "scale": [c], "vae": {...}}),
  when given, is written to `latents_dir/latent_stats.json`. `vae` ({"path", "step", "sha256"}: the
  VAE that encoded them) is stored inside the split as LATENTS_VAE, for `check_latents`.
  """
  def checked():
    for ex in examples:
      missing = set(LATENT_KEYS) - set(ex)
      if missing:
        raise ValueError(f"latent example lacks {sorted(missing)}; needs {list(LATENT_KEYS)}")
      yield {k: ex[k] for k in LATENT_KEYS}

  out = write_dataset(latents_dir, name=name, split=split, features=latent_features(),
                      examples=checked(), description="VAE latents of a video data set",
                      extra_files={LATENTS_VAE: json.dumps(dict(vae), indent=2)} if vae else None)
  if stats is not None:
    write_latent_stats(latents_dir, stats)
  return out


def write_latent_stats(latents_dir: str | os.PathLike, stats: Mapping) -> None:
  path = Path(latents_dir) / LATENT_STATS
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_json(path, dict(stats), sort_keys=True)


def read_latent_stats(latents_dir: str | os.PathLike) -> dict:
  path = Path(latents_dir) / LATENT_STATS
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: encode the videos first (python "
                            f"data_pipelines/encode_latents.py --vae VAE_RUN --data_dir VIDEOS --out_dir "
                            f"{latents_dir})")
  return json.loads(path.read_text())


# ------------------------------------------------------------------ which VAE the latents came from
# Latents, their statistics and the VAE that decodes them must match: a DiT trained on one VAE's
# latents, shipped with another VAE or normalised by another VAE's statistics, is silently wrong. The
# VAE is recorded as {"path", "step", "sha256" (of its weights, bundle.params_sha256)} in
# latent_stats.json ("vae_source"), inside every latent split (LATENTS_VAE), and by the DiT trainer in
# its run directory (train.py); train, export and encode_latents compare them.

class StaleLatents(ValueError):
  """Latents, latent statistics, a DiT run or a VAE that do not come from the same VAE (one line)."""


def describe_vae(record: Mapping | None) -> str:
  if not record:
    return "an unrecorded VAE"
  step = record.get("step")
  return (f"VAE {record.get('path', '?')}" + (f" step {step}" if step is not None else "")
          + f" (weights sha256 {str(record.get('sha256', ''))[:12]})")


def latents_vae(latents_dir: str | os.PathLike, split: str, *, name: str | None = None) -> dict | None:
  """The VAE record stored with a latent split, or None (encoded before records were kept)."""
  path = find_dataset_dir(latents_dir, split, name) / LATENTS_VAE
  return json.loads(path.read_text()) if path.is_file() else None


def check_latents(latents_dir: str | os.PathLike, split: str, *, name: str | None = None) -> dict:
  """latent_stats.json of `latents_dir`, after checking that split `split` was encoded by the VAE the
  statistics were computed from; StaleLatents names both and the command that rebuilds them.
  Statistics without a VAE checksum (written by hand, or before checksums were kept) are not checked."""
  stats = read_latent_stats(latents_dir)
  want = (stats.get("vae_source") or {}).get("sha256")
  if not want:
    return stats
  got = latents_vae(latents_dir, split, name=name)
  if (got or {}).get("sha256") != want:
    raise StaleLatents(
        f"{latents_dir}: the {split!r} latents come from {describe_vae(got)} but latent_stats.json from "
        f"{describe_vae(stats.get('vae_source'))}; rebuild them together: python "
        f"data_pipelines/encode_latents.py --vae {stats['vae_source'].get('path', 'VAE_RUN')} "
        f"--data_dir VIDEOS --out_dir {latents_dir}")
  return stats
