"""Training and evaluation numbers: the one PSNR and the one SSIM (the VAE trainer's validation, the
evaluator's report, reconstruct and the benches all score with these), and where numbers and samples
go: W/metrics.jsonl (one JSON object per call), TensorBoard (tensorboardX, under W/tb), and sample
videos under W/samples.

Only one process writes (process 0 by default); the others get a writer that does nothing, so the
trainers call it unconditionally.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np


def _plain(v):
  """A JSON-able Python number from a numpy / jax scalar (non-finite floats become strings)."""
  v = np.asarray(v).item() if not isinstance(v, (int, float, str)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


_SSIM_TAPS = 11
_SSIM_SIGMA = 1.5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """Peak signal-to-noise ratio in dB of two uint8 images or videos, over all pixels (peak 255).

  Identical inputs score inf (averages that must stay finite drop it, as `evaluate.bootstrap_mean` does).
  """
  mse = np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
  return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _valid_filter(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering over the H and W axes (-3, -2) of `[..., H, W, C]`."""
  k = len(taps)
  h = sum(taps[i] * x[..., i:x.shape[-3] - k + 1 + i, :, :] for i in range(k))
  return sum(taps[i] * h[..., :, i:h.shape[-2] - k + 1 + i, :] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
  """Mean SSIM of two uint8 videos `[T, H, W, C]` (or images `[H, W, C]`), over frames and channels.

  Wang et al. 2004 as in their reference code (and skimage's `gaussian_weights=True`): an 11x11
  Gaussian window of sigma 1.5 per channel, K1 = 0.01, K2 = 0.03, L = 255, averaged over the positions
  where the window lies inside the frame.
  """
  x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if x.shape != y.shape or x.ndim not in (3, 4):
    raise ValueError(f"ssim of shapes {x.shape} and {y.shape}; accepted: two of one shape, "
                     "[T, H, W, C] or [H, W, C]")
  if min(x.shape[-3:-1]) < _SSIM_TAPS:
    raise ValueError(f"ssim of {x.shape[-3]}x{x.shape[-2]} frames; accepted: frames of at least "
                     f"{_SSIM_TAPS}x{_SSIM_TAPS} pixels (the window)")
  taps = np.exp(-0.5 * ((np.arange(_SSIM_TAPS) - _SSIM_TAPS // 2) / _SSIM_SIGMA) ** 2)
  taps /= taps.sum()
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  mx, my = _valid_filter(x, taps), _valid_filter(y, taps)
  sxx = _valid_filter(x * x, taps) - mx * mx
  syy = _valid_filter(y * y, taps) - my * my
  sxy = _valid_filter(x * y, taps) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  return float(np.mean(s))


class MetricWriter:
  """Scalars to W/metrics.jsonl and TensorBoard; images and videos to TensorBoard and W/samples."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # Append: a resumed run continues the same file (steps after a resume may repeat ones already
    # logged before a kill; readers keep the last record of each step).
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    from tensorboardX import SummaryWriter  # imported here: only the writing process needs it
    self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """uint8 images `[H, W, 3]` to TensorBoard."""
    if not self.enabled:
      return
    for k, img in images.items():
      self._tb.add_image(k, np.asarray(img), int(step), dataformats="HWC")

  def write_video(self, step: int, name: str, frames: np.ndarray, fps: float = 8.0) -> str | None:
    """uint8 frames `[T, H, W, 3]`: a gif under W/samples, and a filmstrip of the frames in TensorBoard.

    Returns the gif's path (None on a non-writing process).
    """
    if not self.enabled:
      return None
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"write_video({name!r}): frames {frames.dtype}{list(frames.shape)}; "
                       "accepted: uint8 [T, H, W, 3]")
    out_dir = os.path.join(self.workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name.replace('/', '_')}_{int(step):08d}.gif")
    _write_gif(path, frames, fps)
    self._tb.add_image(name, np.concatenate(list(frames), axis=1), int(step), dataformats="HWC")
    return path

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      self.enabled = False


def _write_gif(path: str, frames: np.ndarray, fps: float) -> None:
  # PyAV writes gif with no system ffmpeg (docs/hazards.md); kept local so metrics does not depend on the
  # video_io module's formats.
  import av
  from fractions import Fraction
  with av.open(path, mode="w") as container:
    stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1000))
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "rgb8"
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl merged per step, later values winning (resumed runs repeat steps)."""
  by_step: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        by_step.setdefault(r["step"], {}).update(r)
  return [by_step[s] for s in sorted(by_step)]
