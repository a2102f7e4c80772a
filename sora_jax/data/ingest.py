"""Turning a folder of captioned videos and images into a video data set (data_pipelines/ingest_videos.py).

Per file, in a worker process: stream-decode with PyAV (sora_jax.video_io), resample to the target fps by
sample-and-hold on the frame timestamps, resize keeping the aspect ratio to fit a pixel budget (then trim
at most 15 pixels per axis so both sides are multiples of 16; never a square crop), and cut into
consecutive clips of at most `max_frames` frames, each snapped down to 1 + 4k frames. A file is either
ingested whole or rejected with a reason: a decode error anywhere rejects all of its clips, and the
data set is written by tfds into a temporary directory that is renamed only when complete, so no
partial record ever exists. The parent collects results in input order, so the output is deterministic.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from sora_jax import video_io

REPORT = "ingest_report.json"
MEDIA_SUFFIXES = video_io.VIDEO_SUFFIXES + video_io.IMAGE_SUFFIXES + (".npy",)  # .npy: exact uint8 frames


@dataclasses.dataclass(frozen=True)
class IngestOptions:
  fps: float = 8.0              # output frame rate
  max_seconds: float = 4.0      # longest clip; longer videos are split
  max_pixels: int = 128 * 128   # H * W budget of the output frames
  min_side: int = 32            # smallest output side (tiny inputs are scaled up to it)
  min_tail_frames: int = 9      # a video's last, shorter clip is kept only if it has this many frames
  max_aspect: float = 4.0       # wider (or taller) inputs are rejected: no crop, no squash

  @property
  def max_frames(self) -> int:
    return 1 + 4 * max(int(self.max_seconds * self.fps) // 4, 0)


def snap_frames(n: int) -> int:
  """The largest frame count 1 + 4k not above n (n >= 1)."""
  return 1 + 4 * ((n - 1) // 4)


def target_size(height: int, width: int, opts: IngestOptions) -> tuple[tuple[int, int], tuple[int, int]]:
  """((resize_h, resize_w), (out_h, out_w)): the aspect-preserving resize and its multiple-of-16 trim."""
  scale = min(1.0, math.sqrt(opts.max_pixels / (height * width)))
  scale = max(scale, opts.min_side / min(height, width))
  rh, rw = max(round(height * scale), 16), max(round(width * scale), 16)
  return (rh, rw), (rh // 16 * 16, rw // 16 * 16)


def _resize(frame: np.ndarray, resize_hw, out_hw) -> np.ndarray:
  from PIL import Image
  if frame.shape[:2] != tuple(resize_hw):
    # Pillow's bilinear filter widens its support when shrinking, so downscaling is antialiased.
    frame = np.asarray(Image.fromarray(frame).resize(resize_hw[::-1], Image.Resampling.BILINEAR))
  top = (resize_hw[0] - out_hw[0]) // 2
  left = (resize_hw[1] - out_hw[1]) // 2
  return frame[top:top + out_hw[0], left:left + out_hw[1]]


def resample(frames: Iterable[tuple[float, np.ndarray]], src_fps: float, fps: float
             ) -> Iterator[np.ndarray]:
  """Sample-and-hold: output frame k (time k / fps) is the latest input frame shown at that time;
  the last input frame is shown for one source frame period."""
  k, prev = 0, None
  for t, frame in frames:
    while prev is not None and k / fps < t - 1e-6:
      yield prev
      k += 1
    prev = frame
    last_t = t
  if prev is None:
    return
  end = last_t + 1.0 / src_fps
  while k / fps < end - 1e-6:
    yield prev
    k += 1


def process_file(path: str | os.PathLike, opts: IngestOptions) -> list[np.ndarray]:
  """All clips (uint8 [T, H, W, 3], T = 1 + 4k) of one file; raises VideoReadError if unusable."""
  src_fps, frames = video_io.iter_frames(path)
  clips: list[np.ndarray] = []
  current: list[np.ndarray] = []
  geometry = None
  is_image = Path(path).suffix.lower() in video_io.IMAGE_SUFFIXES
  stream = (f for _, f in frames) if is_image else resample(frames, src_fps, opts.fps)
  for frame in stream:
    if geometry is None:
      h, w = frame.shape[:2]
      if max(h, w) / min(h, w) > opts.max_aspect:
        raise video_io.VideoReadError(f"{path}: aspect ratio {w}x{h} is beyond {opts.max_aspect:g}:1")
      geometry = target_size(h, w, opts)
      source_shape = frame.shape
    elif frame.shape != source_shape:
      raise video_io.VideoReadError(f"{path}: frame size changes mid-stream "
                                    f"{source_shape[:2]} -> {frame.shape[:2]}")
    current.append(_resize(frame, *geometry))
    if len(current) == opts.max_frames:
      clips.append(np.stack(current))
      current = []
  if current:
    n = snap_frames(len(current))
    if not clips or n >= opts.min_tail_frames:
      clips.append(np.stack(current[:n]))
  if not clips:
    raise video_io.VideoReadError(f"{path}: no frames")
  return clips


@dataclasses.dataclass(frozen=True)
class Job:
  file: str          # relative to the input dir
  caption: str


def read_captions(captions_path: str | os.PathLike) -> tuple[dict[str, str | None], list[dict]]:
  """{file: caption} from a jsonl file, and the problems found in it (as report entries). A caption
  that is not valid UTF-8 is reported and its file maps to None: stored with replacement characters,
  it would teach the model garbage without anyone knowing."""
  captions: dict[str, str | None] = {}
  problems: list[dict] = []
  where = Path(captions_path).name
  with open(captions_path, "rb") as f:
    for n, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      invalid = None
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        invalid = f"byte 0x{raw[e.start]:02x} at column {e.start + 1} of line {n}"
        line = raw.decode("utf-8", errors="replace")  # enough to find which file it captions
      try:
        entry = json.loads(line)
        file, text = entry["file"], entry["caption"]
        if not isinstance(file, str) or not isinstance(text, str):
          raise TypeError("file and caption must be strings")
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        problems.append({"file": f"{where}:{n}", "reason": f"bad captions line ({type(e).__name__}: {e})"})
        continue
      try:  # JSON escapes can spell a lone surrogate, which no UTF-8 text holds
        text.encode("utf-8")
      except UnicodeEncodeError as e:
        invalid = invalid or f"lone surrogate {text[e.start]!r} at character {e.start + 1} (line {n})"
      file = os.path.normpath(file)
      if file in captions:
        problems.append({"file": file, "reason": f"duplicate caption (line {n}); the first one is used"})
        continue
      if invalid:
        problems.append({"file": file, "reason": f"caption is not valid UTF-8 ({invalid} of {where})"})
        captions[file] = None
        continue
      captions[file] = " ".join(text.split())
  return captions, problems


def plan(input_dir: str | os.PathLike, captions_path: str | os.PathLike
         ) -> tuple[list[Job], list[dict]]:
  """Which files to ingest (sorted), and those skipped before decoding, with reasons."""
  root = Path(input_dir)
  captions, skipped = read_captions(captions_path)
  captions_file = Path(captions_path).resolve()
  present = sorted(os.path.normpath(p.relative_to(root)) for p in root.rglob("*")
                   if p.is_file() and p.resolve() != captions_file)
  jobs = []
  for file in present:
    suffix = Path(file).suffix.lower()
    caption = captions.get(file)
    if file in captions and caption is None:
      continue  # its caption was reported unreadable by read_captions
    if suffix not in MEDIA_SUFFIXES:
      skipped.append({"file": file, "reason": f"not a video or image (suffix {suffix!r})"})
    elif caption is None:
      skipped.append({"file": file, "reason": "no caption in the captions file"})
    elif not caption:
      skipped.append({"file": file, "reason": "empty caption"})
    else:
      jobs.append(Job(file, caption))
  for file in sorted(f for f in set(captions) - set(present) if captions[f] is not None):
    skipped.append({"file": file, "reason": "captioned but missing from the input folder"})
  return jobs, skipped


def run_job(args: tuple[str, Job, IngestOptions]) -> tuple[Job, list[np.ndarray] | None, str]:
  """Worker entry: (job, clips or None, reason). Never raises, so one bad file cannot stop the run."""
  root, job, opts = args
  try:
    return job, process_file(Path(root) / job.file, opts), ""
  except video_io.VideoReadError as e:
    return job, None, str(e).replace(str(Path(root) / job.file) + ": ", "")
  except (MemoryError, Exception) as e:  # a codec or library bug must not end the whole ingest
    return job, None, f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:160]}"
