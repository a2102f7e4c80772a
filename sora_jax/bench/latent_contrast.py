"""How far apart a bundle's VAE puts each Shapes colour from each background, in the DiT's latent units.

    python -m sora_jax.bench.latent_contrast --bundle runs/demo/bundle

Encodes a flat 32x32 frame of every colour and every background and prints, per background, each colour's
contrast: the distance between its latent and the background's (the mean over the frame's central 2x2
latent positions, in the bundle's normalised units, the space the DiT denoises in), and that distance per
unit of pixel distance (pixels in [-1, 1]). Squared and divided by the channels, a contrast compares with
`evaluate`'s object_token_error (a mean squared error per latent element; 0.75 at t = 0.7 for the demo): a
colour whose contrast falls below the DiT's error is the one whose objects it loses: the demo's VAE put green 2.6-4.4x closer than red, blue,
yellow and white, and green was the colour the demo's samples missed most (docs/benchmarks.md, "Learning
curve: the demo's recipe to 4x its DiT compute").
"""
from __future__ import annotations

import json

from absl import app, flags
import numpy as np

from sora_jax import bundle as bundle_lib
from sora_jax import sampling
from sora_jax.data import shapes

FLAGS = flags.FLAGS
SIZE = 32


def define_flags() -> None:
  """The command's flags, defined only when it runs as a command (tests import the module)."""
  flags.DEFINE_string("bundle", None, "inference bundle")


def _centre_latent(pipe, rgb) -> np.ndarray:
  frame = np.broadcast_to(np.asarray(rgb, np.uint8), (1, SIZE, SIZE, 3))
  z = pipe.encode(frame)  # [1, h, w, c]
  h, w = z.shape[1] // 2, z.shape[2] // 2
  return z[0, h - 1:h + 1, w - 1:w + 1].mean(axis=(0, 1))


def contrasts(pipe) -> dict:
  """{background: {colour: {"latent": distance, "per_pixel": distance / pixel distance}}}."""
  out = {}
  for bg, bg_rgb in shapes.BACKGROUNDS.items():
    z_bg = _centre_latent(pipe, bg_rgb)
    out[bg] = {}
    for colour, rgb in shapes.COLOURS.items():
      d = float(np.linalg.norm(_centre_latent(pipe, rgb) - z_bg))
      px = float(np.linalg.norm((np.asarray(rgb, float) - np.asarray(bg_rgb, float)) / 127.5))
      out[bg][colour] = {"latent": d, "per_pixel": d / px}
  return out


def main(argv):
  del argv
  pipe = sampling.as_pipeline(bundle_lib.load(FLAGS.bundle))
  result = contrasts(pipe)
  for bg, row in result.items():
    print(f"on {bg}: " + "  ".join(f"{c} {v['latent']:.2f} ({v['per_pixel']:.2f}/px)" for c, v in row.items()))
  print(json.dumps({"bundle": FLAGS.bundle, "contrast": result}))


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("bundle")
  app.run(main)
