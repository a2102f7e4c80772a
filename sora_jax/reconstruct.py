"""Round-trips a video or an image through a trained VAE: encode, decode, write.

    python -m sora_jax.reconstruct --vae runs/demo/vae --input in.mp4 --out out.mp4
    python -m sora_jax.reconstruct --vae runs/demo/bundle --input photo.png --out recon.npy

`--vae` is a VAE training workdir (its newest checkpoint's EMA weights) or an inference bundle.
Inputs: mp4/webm/mov/gif/mkv/avi videos, png/jpg images, .npy uint8 [T, H, W, 3]. Outputs by
suffix: .mp4 (lossy h264), .gif, .png (one frame, or all frames in a grid), .npy (the exact uint8
frames [T, H, W, 3]). Inputs off the VAE's grid (T not 1 + ft*k, H or W not a multiple of the
spatial factor) are padded (the last frame repeated, the edges replicated) and the output is cropped
back to the input's size. The causal encoder cannot see padded future frames from earlier ones, so
time padding changes no real frame's latent. Encoding and decoding run chunked (memory flat in
length) and tiled above --max_tile_pixels. Prints the round trip's PSNR. Launched multi-host (as
`train` is), process 0 does the work (one video) and the others wait for it.
"""
from __future__ import annotations

import logging
import sys
import time

from absl import flags
import numpy as np

from sora_jax import config as config_lib
from sora_jax import distributed

_VAE = config_lib.flag(flags.DEFINE_string, "vae", None, "VAE workdir or inference bundle")
_INPUT = config_lib.flag(flags.DEFINE_string, "input", None, "video (mp4, gif, ...), image (png, jpg) or .npy frames")
_OUT = config_lib.flag(flags.DEFINE_string, "out", None, "output .mp4, .gif, .png or .npy")
_MAX_TILE = config_lib.flag(flags.DEFINE_integer, "max_tile_pixels", 0,
                            "tile frames above this many pixels; 0 = never", lower_bound=0)
_FPS = config_lib.flag(flags.DEFINE_float, "fps", 0.0, "output frame rate; 0 = the input's",
                          lower_bound=0.0)


def pad_to_grid(frames: np.ndarray, temporal: int, spatial: int) -> np.ndarray:
  """Pads uint8 [T, H, W, 3] to T = 1 + temporal*k and H, W multiples of `spatial`."""
  t, h, w = frames.shape[:3]
  pt = (-(t - 1)) % temporal
  ph, pw = (-h) % spatial, (-w) % spatial
  return np.pad(frames, ((0, pt), (0, ph), (0, pw), (0, 0)), mode="edge")


def reconstruct(vae, frames: np.ndarray, *, max_tile_pixels: int = 0) -> np.ndarray:
  """uint8 [T, H, W, 3] -> its uint8 reconstruction, same shape (posterior mean, no sampling)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  s = vae.settings
  t, h, w = frames.shape[:3]
  x = pad_to_grid(frames, s.temporal_factor, s.spatial_factor)
  x = jnp.asarray(x[None], jnp.float32) / 127.5 - 1.0
  mean, _ = vae.encode_chunked(x, max_tile_pixels=max_tile_pixels)
  y = vae.decode_chunked(mean, max_tile_pixels=max_tile_pixels)
  y = np.asarray(jnp.round((jnp.clip(y[0], -1.0, 1.0) + 1.0) * 127.5), np.uint8)
  return y[:t, :h, :w]


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  from sora_jax import video_io  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.WARNING)
  for name, flag in (("--vae", _VAE), ("--input", _INPUT), ("--out", _OUT)):
    if not flag.value:
      _fail(f"{name} is required")
  suffix = "." + _OUT.value.rsplit(".", 1)[-1].lower() if "." in _OUT.value else ""
  if suffix not in video_io.WRITE_SUFFIXES:
    _fail(f"--out {_OUT.value}: suffix {suffix or '(none)'!r} is not one of "
          f"{list(video_io.WRITE_SUFFIXES)}")
  distributed.initialize()  # on a multi-host launch: process 0 does the work, the others wait for it
  try:
    distributed.write_on_main(_run)
  except (ValueError, FileNotFoundError) as e:  # VideoReadError included
    _fail(str(e).splitlines()[0])


def _run():
  from sora_jax import metrics  # pylint: disable=g-import-not-at-top
  from sora_jax import video_io  # pylint: disable=g-import-not-at-top
  from sora_jax.train_vae import load  # pylint: disable=g-import-not-at-top
  frames, fps = video_io.read_video(_INPUT.value)  # VideoReadError is a ValueError
  vae, _, step = load(_VAE.value)
  t0 = time.time()
  out = reconstruct(vae, frames, max_tile_pixels=_MAX_TILE.value)
  video_io.write_video(_OUT.value, out, fps=_FPS.value or fps)
  s = vae.settings
  print(f"reconstructed {frames.shape[0]} frames at {frames.shape[1]}x{frames.shape[2]} "
        f"(grid {s.temporal_factor}x{s.spatial_factor}x{s.spatial_factor}, VAE step {step}) in "
        f"{time.time() - t0:.1f}s: PSNR {metrics.psnr(frames, out):.2f} dB -> {_OUT.value}")


if __name__ == "__main__":
  config_lib.run(main, config=False)
