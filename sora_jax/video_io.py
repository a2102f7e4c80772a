"""Reading and writing video files: the only place that touches containers and codecs (PyAV, no ffmpeg).

    frames, fps = read_video("clip.mp4")          # uint8 [T, H, W, 3]; png/jpg give one frame
    write_video("out.mp4", frames, fps=8)          # by suffix: .mp4 .gif .png (grid) .npy (exact)

Everything that fails to decode raises `VideoReadError` with one line naming the file and the reason,
so ingestion can skip and report it. Frames come out upright: a video's display matrix and an image's
EXIF orientation are applied.
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif", ".mkv", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
WRITE_SUFFIXES = (".mp4", ".gif", ".png", ".npy")
IMAGE_FPS = 8.0  # a still image is a one-frame video; its fps is nominal


class VideoReadError(ValueError):
  """A file that is missing, empty, truncated, corrupt or not a video/image."""


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
  """Decodes a video (mp4/webm/mov/gif/...) or an image (png/jpg) into (uint8 [T, H, W, 3], fps)."""
  fps, frames = iter_frames(path)
  times, stacked = zip(*frames)
  if len({f.shape for f in stacked}) > 1:
    raise VideoReadError(f"{path}: frame size changes mid-stream {sorted({f.shape for f in stacked})}")
  video = np.stack(stacked)
  if Path(path).suffix.lower() == ".gif" and len(times) > 1 and times[-1] > 0:
    # GIF delays vary and the stream's nominal rate is a guess. Encoders (Pillow among them) merge
    # identical consecutive frames into one with the summed delay: expand each frame back to whole
    # multiples of the typical delay, so a written T-frame clip reads back as T frames.
    gaps = np.diff(np.r_[np.asarray(times, np.float64), _gif_end(path, times[-1])])
    base = float(np.median(gaps[gaps > 0])) if np.any(gaps > 0) else 0.0
    if base > 0:
      counts = np.maximum(1, np.round(gaps / base)).astype(int)
      video = np.repeat(video, counts, axis=0)
      fps = float(counts[:-1].sum()) / times[-1]
  return video, fps


def _gif_end(path, last_start: float) -> float:
  """When a GIF's last frame ends (its stream duration); `last_start` if the file does not say."""
  import av
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    if stream.duration and stream.time_base:
      return max(last_start, float(stream.duration * stream.time_base))
  return last_start


def iter_frames(path: str | os.PathLike) -> tuple[float, Iterator[tuple[float, np.ndarray]]]:
  """Streams a file as (fps, iterator of (seconds since the first frame, uint8 [H, W, 3])).

  The container is opened (and the first frame decoded) before this returns, so a file that cannot
  be read at all fails here; a decode error later raises from the iterator. Either way the error is
  a `VideoReadError`.
  """
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix not in VIDEO_SUFFIXES + IMAGE_SUFFIXES + (".npy",):
    raise VideoReadError(f"{path}: suffix {suffix!r} is not one of {list(VIDEO_SUFFIXES + IMAGE_SUFFIXES)}")
  if not path.is_file():
    raise VideoReadError(f"{path}: no such file")
  if path.stat().st_size == 0:
    raise VideoReadError(f"{path}: empty file (0 bytes)")
  if suffix == ".npy":
    frames = _check_frames(np.load(path), path)
    return IMAGE_FPS, ((i / IMAGE_FPS, f) for i, f in enumerate(frames))
  if suffix in IMAGE_SUFFIXES:
    return IMAGE_FPS, iter([(0.0, _read_image(path)[0])])
  if suffix == ".gif":
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b";":  # PyAV decodes a cut-off GIF's leading frames without complaint
        raise VideoReadError(f"{path}: truncated GIF (no trailer byte)")
  gen = _decode_av(path)
  fps = next(gen)
  try:
    first = next(gen)
  except StopIteration:
    raise VideoReadError(f"{path}: no decodable frames") from None
  return fps, itertools.chain([first], gen)


def _check_frames(frames: np.ndarray, path) -> np.ndarray:
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
    raise VideoReadError(f"{path}: frames {frames.dtype}{list(frames.shape)} are not uint8 [T>0, H, W, 3]")
  return frames


def _read_image(path: Path) -> np.ndarray:
  from PIL import Image, ImageOps, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      im.load()
      # A camera's EXIF orientation says how to turn the stored picture; without it, it lies sideways.
      rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise VideoReadError(f"{path}: unreadable image ({_short(e)})") from None
  return _check_frames(rgb[None], path)


def _decode_av(path: Path) -> Iterator:
  """Yields the stream's fps, then (seconds, frame) pairs; every failure is a VideoReadError.

  Frames before a decode error may be fine, but a clip silently cut short would carry the wrong
  caption and duration, so a decode error anywhere rejects the whole file.
  """
  import av
  n = 0
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise VideoReadError(f"{path}: no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      rate = stream.average_rate or stream.guessed_rate or stream.base_rate
      fps = float(rate) if rate else 0.0
      if not math.isfinite(fps) or fps <= 0:
        fps = IMAGE_FPS
      yield fps
      t0 = None
      for frame in container.decode(stream):
        t = frame.time if frame.time is not None else n / fps
        t0 = t if t0 is None else t0
        yield max(t - t0, 0.0), _upright(frame, path)
        n += 1
      # A cut-off file whose index sits at the front (mp4 "faststart") decodes its leading frames
      # without any error; the header's frame count gives it away. Slack for edit lists.
      declared = stream.frames or 0
      if declared and n < declared - max(2, declared // 50):
        raise VideoReadError(f"{path}: truncated (decoded {n} of {declared} frames)")
  except VideoReadError:
    raise
  except (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError) as e:
    where = "undecodable" if n == 0 else f"decode error after {n} frames"
    raise VideoReadError(f"{path}: {where} ({_short(e)})") from None


def _upright(frame, path: Path) -> np.ndarray:
  """A decoded frame as it is meant to be shown. Phones store portrait video as landscape pictures
  plus a display matrix saying how to turn them; ignoring it stores the clip sideways. Rotations by
  multiples of 90 degrees are applied; a mirroring or oblique matrix rejects the file."""
  from av.sidedata.sidedata import Type  # pylint: disable=g-import-not-at-top
  rgb = frame.to_ndarray(format="rgb24")
  matrix = frame.side_data.get(Type.DISPLAYMATRIX)
  if matrix is None:
    return rgb
  m = np.frombuffer(bytes(matrix), np.int32).astype(np.int64)  # [a b u; c d v; x y w], 16.16 fixed
  if m[0] * m[4] - m[1] * m[3] < 0:
    raise VideoReadError(f"{path}: its display matrix mirrors the picture (not supported)")
  angle = float(frame.rotation)  # degrees counterclockwise, as FFmpeg reads the matrix
  if angle % 90:
    raise VideoReadError(f"{path}: display rotation {angle:g} degrees is not a multiple of 90")
  return np.ascontiguousarray(np.rot90(rgb, k=round(angle / 90)))


def _short(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text[:160]


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> None:
  """Writes uint8 [T, H, W, 3] (or [H, W, 3]) by suffix: .mp4 (h264, lossy), .gif, .png (the single
  frame, or all frames tiled in a near-square grid), .npy (exact)."""
  path = Path(path)
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[None]
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
    raise ValueError(f"frames {frames.dtype}{list(frames.shape)} must be uint8 [T>0, H, W, 3]")
  suffix = path.suffix.lower()
  if suffix not in WRITE_SUFFIXES:
    raise ValueError(f"cannot write {path}: suffix {suffix!r} is not one of {list(WRITE_SUFFIXES)}")
  path.parent.mkdir(parents=True, exist_ok=True)
  if suffix == ".npy":
    np.save(path, frames)
  elif suffix == ".png":
    from PIL import Image
    Image.fromarray(frame_grid(frames)).save(path)
  elif suffix == ".gif":
    from PIL import Image
    images = [Image.fromarray(f) for f in frames]
    # GIF delays are whole centiseconds: alternate them so the average rate is `fps`.
    ends = np.round(np.arange(1, len(images) + 1) * 100.0 / fps) * 10
    durations = np.diff(np.r_[0.0, ends]).clip(min=20).astype(int).tolist()
    images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                   duration=durations if len(images) > 1 else durations[0], disposal=1)
  else:
    _write_mp4(path, frames, fps)


def _write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
  import av
  from fractions import Fraction
  T, H, W, _ = frames.shape
  # yuv420p needs even sizes; pad by edge replication rather than failing on odd sizes.
  if H % 2 or W % 2:
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
  with av.open(str(path), mode="w") as container:
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "18", "preset": "veryfast"}
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def frame_grid(frames: np.ndarray, *, pad: int = 2, columns: int | None = None) -> np.ndarray:
  """Tiles [T, H, W, 3] frames into one uint8 image (a single frame is returned as is)."""
  T, H, W, C = frames.shape
  if T == 1:
    return frames[0]
  cols = columns or int(math.ceil(math.sqrt(T)))
  rows = int(math.ceil(T / cols))
  out = np.full((rows * (H + pad) - pad, cols * (W + pad) - pad, C), 255, np.uint8)
  for i, f in enumerate(frames):
    r, c = divmod(i, cols)
    out[r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = f
  return out
