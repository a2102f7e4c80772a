"""Which words of the caption the DiT reads: its object-token error with one word of the caption swapped.

    python -m sora_jax.bench.caption_reading --bundle runs/demo/bundle [--mixture demo] [--num_clips 64]
        [--times 0.5,0.7,0.9] [--out F.json]

On the first `num_clips` one-object straight-motion test clips of a Shapes mixture (bench.motion_tracks'),
the DiT's clean-latent error on object tokens (evaluate.per_clip_object_errors: the same latents and
noise, caption given, guidance 1) with the true caption, then with one kind of word swapped for another
of its kind: the motion's direction (left <-> right, up <-> down), the colour, the shape. A DiT that uses a
word predicts worse when it is wrong: the row's increase is mean(error, swapped) / mean(error, true) - 1,
with a 95% paired bootstrap interval over clips. An increase within its interval of 0 says the word is
ignored: then the binary motion score can only be chance, whatever the sampler does.
"""
from __future__ import annotations

import json
import re

from absl import app, flags
import numpy as np

from sora_jax import bundle as bundle_lib
from sora_jax import evaluate
from sora_jax import sampling
from sora_jax.bench import motion_tracks
from sora_jax.data import shapes

FLAGS = flags.FLAGS

# Each word's stand-in when its kind is swapped: another word of the same kind, never itself.
SWAPS = {
    "direction": {"left": "right", "right": "left", "up": "down", "down": "up"},
    "colour": {"red": "blue", "blue": "green", "green": "yellow", "yellow": "white", "white": "red"},
    "shape": {"circle": "square", "square": "triangle", "triangle": "circle"},
}


def define_flags() -> None:
  flags.DEFINE_string("bundle", None, "inference bundle")
  flags.DEFINE_string("mixture", "demo", "Shapes mixture whose test split gives the clips")
  flags.DEFINE_integer("num_clips", 64, "one-object straight-motion test clips", lower_bound=2)
  flags.DEFINE_list("times", ["0.5", "0.7", "0.9"], "diffusion times")
  flags.DEFINE_integer("seed", 0, "noise and bootstrap seed")
  flags.DEFINE_string("out", "", "also write the results as JSON here")


def swap_words(caption: str, kind: str) -> str:
  """`caption` with every word of `kind` (SWAPS) replaced by its stand-in."""
  table = SWAPS[kind]
  return re.sub(r"\b(" + "|".join(table) + r")\b", lambda m: table[m.group(1)], caption)


def paired_increase(true: np.ndarray, swapped: np.ndarray, *, seed: int = 0, draws: int = 2000) -> dict:
  """mean(swapped) / mean(true) - 1 over paired per-clip values, with a 95% bootstrap interval."""
  true, swapped = np.asarray(true, np.float64), np.asarray(swapped, np.float64)
  idx = np.random.default_rng(seed).integers(0, true.size, (draws, true.size))
  boot = swapped[idx].mean(1) / true[idx].mean(1) - 1.0
  return {"increase": float(swapped.mean() / true.mean() - 1.0),
          "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))], "n": int(true.size)}


def caption_reading(pipe, specs, *, times=(0.5, 0.7, 0.9), seed: int = 0) -> dict:
  """{"true": {t: mean object error}, kind: {t: {"error", "increase", "ci95", "n"}}} for each SWAPS kind."""
  latents = [pipe.encode(shapes.render_clip(s)) for s in specs]
  errors = {}
  for kind in ("true",) + tuple(SWAPS):
    captions = [shapes.caption(s) if kind == "true" else swap_words(shapes.caption(s), kind) for s in specs]
    _, per_t = evaluate.per_clip_object_errors(pipe, specs, seed=seed, times=times, latents=latents,
                                               captions=captions)
    errors[kind] = {t: np.asarray(per_t[t]["model"]) for t in times}
  out = {"true": {f"{t:g}": float(errors["true"][t].mean()) for t in times}}
  for kind in SWAPS:
    out[kind] = {f"{t:g}": {"error": float(errors[kind][t].mean()),
                            **paired_increase(errors["true"][t], errors[kind][t], seed=seed)} for t in times}
  return out


def main(argv):
  del argv
  if not FLAGS.bundle:
    raise SystemExit("error: --bundle is required (an exported inference bundle directory)")
  pipe = sampling.as_pipeline(bundle_lib.load(FLAGS.bundle))
  specs = motion_tracks.straight_specs(FLAGS.mixture, FLAGS.num_clips, pipe.geometry.temporal)
  times = tuple(float(t) for t in FLAGS.times)
  got = caption_reading(pipe, specs, times=times, seed=FLAGS.seed)
  print("| word swapped | " + " | ".join(f"t = {t:g}" for t in times) + " |")
  print("|---|" + "---|" * len(times))
  print("| none (error) | " + " | ".join(f"{got['true'][f'{t:g}']:.4f}" for t in times) + " |")
  for kind in SWAPS:
    cells = [got[kind][f"{t:g}"] for t in times]
    print(f"| {kind} | " + " | ".join(
        f"{c['increase']:+.1%} [{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}]" for c in cells) + " |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"bundle": FLAGS.bundle, "mixture": FLAGS.mixture, "clips": len(specs), **got}, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
