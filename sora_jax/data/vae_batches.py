"""Batches for VAE training: images and videos together, sized by a pixel budget, as random crops.

Every step gets one batch of image crops `[Bi, 1, h, w, 3]` and one of video crops `[Bv, T, h', w', 3]`
(uint8). Each batch size is its pixel budget divided by the crop's pixels, so images and videos cost
what they hold instead of being padded to the largest sample; the crop shapes are fixed, so the
train step compiles once. Images come from image records and from single frames of videos (any frame
of a causal video model's input is also an image). Videos are cropped in time (`T = 1 + ft*k` frames
starting anywhere) and in space.

Batches are a pure function of (seed, step), and each row of (seed, step, kind, row): resuming at step s
reproduces the uninterrupted stream with no iterator state to checkpoint, and on several hosts each
builds only its own devices' rows (`spans`) of the batch one host would build. A background thread
reads a few steps ahead.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Crop:
  """One crop shape and how many of it fill the pixel budget."""
  frames: int
  height: int
  width: int
  batch: int

  @classmethod
  def for_budget(cls, frames: int, height: int, width: int, pixels: int) -> "Crop":
    per = frames * height * width
    if pixels < per:
      raise ValueError(f"pixel budget {pixels} is smaller than one {frames}x{height}x{width} crop "
                       f"({per} pixels)")
    return cls(frames, height, width, pixels // per)

  @property
  def shape(self) -> tuple[int, int, int, int, int]:
    return (self.batch, self.frames, self.height, self.width, 3)


def _crop_2d(frames: np.ndarray, height: int, width: int, rng: np.random.Generator,
             tries: int = 1) -> np.ndarray:
  """A random `height x width` window; frames smaller than it are edge-padded first.

  With `tries > 1`, that many windows are drawn and the busiest one (largest pixel variance over all
  its frames) is kept: most random windows of a Shapes frame are flat background, which teaches the
  VAE nothing after its first steps, while the objects and their motion are what it must learn.
  """
  h, w = frames.shape[1:3]
  if h < height or w < width:
    frames = np.pad(frames, ((0, 0), (0, max(0, height - h)), (0, max(0, width - w)), (0, 0)),
                    mode="edge")
    h, w = frames.shape[1:3]
  best, best_var = None, -1.0
  for _ in range(max(1, tries)):
    y = int(rng.integers(0, h - height + 1))
    x = int(rng.integers(0, w - width + 1))
    window = frames[:, y:y + height, x:x + width]
    var = float(np.var(window[:, ::2, ::2], dtype=np.float32)) if tries > 1 else 0.0
    if var > best_var:
      best, best_var = window, var
  return best


class VAEBatches:
  """Random-access `batch(step)` and a prefetching iterator over a video source.

  `source` is any random-access sequence of records with `video` uint8 `[T, H, W, 3]`
  (`sora_jax.data.sources.video_source`). Videos shorter than the video crop are used as images only.
  """

  def __init__(self, source: Sequence[dict], *, image: Crop, video: Crop, seed: int = 0,
               crop_tries: int = 1, max_draws: int = 1000):
    if len(source) == 0:
      raise ValueError("the VAE's training source is empty")
    self.source, self.image, self.video, self.seed = source, image, video, seed
    self.crop_tries = crop_tries
    self.max_draws = max_draws

  def _pick(self, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(self.source[int(rng.integers(len(self.source)))]["video"])

  def _image_row(self, rng: np.random.Generator) -> np.ndarray:
    clip = self._pick(rng)
    return _crop_2d(clip[int(rng.integers(clip.shape[0]))][None], self.image.height, self.image.width,
                    rng, self.crop_tries)

  def _video_row(self, rng: np.random.Generator) -> np.ndarray:
    for _ in range(self.max_draws):
      clip = self._pick(rng)
      if clip.shape[0] >= self.video.frames:
        start = int(rng.integers(0, clip.shape[0] - self.video.frames + 1))
        return _crop_2d(clip[start:start + self.video.frames], self.video.height, self.video.width, rng,
                        self.crop_tries)
    raise ValueError(f"no {self.video.frames}-frame clips found in {self.max_draws} draws from a "
                     f"source of {len(self.source)} records; lower vae_train.video_frames")

  def rows(self, step: int, kind: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the step's `kind` batch ("images" or "videos"); row i is a function of
    (seed, step, kind, i) alone."""
    crop, make = {"images": (self.image, self._image_row), "videos": (self.video, self._video_row)}[kind]
    if not 0 <= start <= stop <= crop.batch:
      raise ValueError(f"rows [{start}, {stop}) of a batch of {crop.batch} {kind}")
    out = np.empty((stop - start,) + crop.shape[1:], np.uint8)
    for j in range(stop - start):
      out[j] = make(np.random.default_rng([self.seed, int(step), 0xAE, kind == "videos", start + j]))
    return out

  def batch(self, step: int, spans: dict[str, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """The step's {"images": [Bi, 1, h, w, 3], "videos": [Bv, T, h', w', 3]} uint8 batches, or with
    `spans` ({kind: (start, stop)}) only those rows of each."""
    spans = spans or {"images": (0, self.image.batch), "videos": (0, self.video.batch)}
    return {kind: self.rows(step, kind, *spans[kind]) for kind in ("images", "videos")}

  def iterate(self, start_step: int, *, spans: dict[str, tuple[int, int]] | None = None,
              prefetch: int = 3) -> Iterator[dict[str, np.ndarray]]:
    """Batches (their `spans` rows) for steps start_step, start_step + 1, ..., read `prefetch` steps ahead
    in a thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def work():
      step = start_step
      try:
        while not stop.is_set():
          q.put(self.batch(step, spans))
          step += 1
      except BaseException as e:  # surfaced in the consumer, not lost in the thread
        q.put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
      while True:
        item = q.get()
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop.set()
      while not q.empty():
        q.get_nowait()
