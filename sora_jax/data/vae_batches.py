"""Batches for VAE training: images and videos together, sized by a pixel budget, as random crops.

Every step gets one batch of image crops `[Bi, 1, h, w, 3]` and one of video crops `[Bv, T, h', w', 3]`
(uint8). Each batch size is its pixel budget divided by the crop's pixels, so images and videos cost
what they hold instead of being padded to the largest sample; the crop shapes are fixed, so the
train step compiles once. Images come from image records and from single frames of videos (any frame
of a causal video model's input is also an image). Videos are cropped in time (`T = 1 + ft*k` frames
starting anywhere) and in space.

Batches are a pure function of (seed, step): resuming at step s reproduces the uninterrupted stream
with no iterator state to checkpoint. A background thread reads a few steps ahead.
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

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, int(step), 0xAE])
    images = np.empty(self.image.shape, np.uint8)
    videos = np.empty(self.video.shape, np.uint8)
    n_img = n_vid = 0
    for _ in range(self.max_draws):
      if n_img == self.image.batch and n_vid == self.video.batch:
        break
      clip = np.asarray(self.source[int(rng.integers(len(self.source)))]["video"])
      t = clip.shape[0]
      if t >= self.video.frames and n_vid < self.video.batch:
        start = int(rng.integers(0, t - self.video.frames + 1))
        videos[n_vid] = _crop_2d(clip[start:start + self.video.frames], self.video.height,
                                 self.video.width, rng, self.crop_tries)
        n_vid += 1
        if n_img == self.image.batch:
          continue
      if n_img < self.image.batch:
        frame = clip[int(rng.integers(t))][None]
        images[n_img] = _crop_2d(frame, self.image.height, self.image.width, rng,
                                 self.crop_tries)
        n_img += 1
    else:
      raise ValueError(f"no {self.video.frames}-frame clips found in {self.max_draws} draws from a "
                       f"source of {len(self.source)} records; lower vae_train.video_frames")
    return {"images": images, "videos": videos}

  def iterate(self, start_step: int, *, prefetch: int = 3) -> Iterator[dict[str, np.ndarray]]:
    """Batches for steps start_step, start_step + 1, ..., read `prefetch` steps ahead in a thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def work():
      step = start_step
      try:
        while not stop.is_set():
          q.put(self.batch(step))
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
