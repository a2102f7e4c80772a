"""Where a bundle's motion breaks: object centroid steps within and across the VAE's latent frames.

    python -m sora_jax.bench.motion_tracks --bundle runs/demo/bundle [--num_clips 24] [--mixture single]

Generates the first `num_clips` one-object, straight-motion test clips of a Shapes mixture (uncut, at
least 2 latent frames), tracks the object's colour centroid in every frame (the detector's track) along
its motion axis, and reports the mean absolute step between consecutive frames, split into steps inside
one latent frame (frames 4k+1 .. 4k+4 of a causal VAE with temporal factor 4 decode from latent frame k+1)
and steps that cross into the next latent frame, for the generated clips and their ground-truth renders.
A DiT that moves its object coherently matches the truth on both; one that redraws the object in each
latent frame shows small steps inside latent frames and jumps across them.

It also counts the clips whose motion the detector reads right, generated from the caption alone and
from the caption with the true render's first frame given (image-to-video, sampling.image_prompt): a
DiT that cannot start a track but can carry one scores the second far higher than the first.
"""
from __future__ import annotations

import json

from absl import app, flags
import numpy as np

from sora_jax import bundle as bundle_lib
from sora_jax import detector
from sora_jax import evaluate
from sora_jax import sampling
from sora_jax.data import shapes

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs as a command: tests import this module beside
  entry points that define --bundle and --seed themselves."""
  flags.DEFINE_string("bundle", None, "inference bundle")
  flags.DEFINE_integer("num_clips", 24, "clips to generate", lower_bound=1)
  flags.DEFINE_string("mixture", "single", "Shapes mixture whose test split gives the prompts")
  flags.DEFINE_integer("seed", 0, "sampling seed")


def straight_clips(bundle: str | None, mixture: str, n: int):
  """(pipeline, specs): the bundle's pipeline and the first n one-object straight-motion test clips of
  `mixture` (evaluate.straight_specs): what the straight-motion benches (this one, sample_trajectory,
  caption_reading) start from."""
  if not bundle:
    raise SystemExit("error: --bundle is required (an exported inference bundle directory)")
  pipe = sampling.as_pipeline(bundle_lib.load(bundle))
  return pipe, evaluate.straight_specs(mixture, n, pipe.geometry.temporal)


def axis_track(frames: np.ndarray, spec: shapes.ClipSpec) -> np.ndarray:
  """The object's centroid per frame along its motion axis, in pixels (NaN where it is not found)."""
  o = spec.objects[0]
  cls, con = detector.classify_pixels(frames)
  _, xy = detector.colour_track(cls, con, detector.COLOUR_NAMES.index(o.colour) + 1, 4.0)
  axis = 0 if ("left" in o.motion or "right" in o.motion) else 1
  return xy[:, axis]


def step_sizes(track: np.ndarray, temporal: int) -> tuple[float, float]:
  """Mean |step| (pixels per frame) inside latent frames and across their boundaries."""
  steps = np.abs(np.diff(track))
  crossing = np.arange(len(steps)) % temporal == 0  # frame 4k -> 4k+1 enters latent frame k+1
  inside = steps[~crossing][np.isfinite(steps[~crossing])]
  across = steps[crossing][np.isfinite(steps[crossing])]
  return (float(inside.mean()) if inside.size else np.nan, float(across.mean()) if across.size else np.nan)


def motion_hits(videos, specs: list[shapes.ClipSpec]) -> int:
  """How many videos the detector reads as moving as their spec's caption says."""
  return sum(v is not None and bool(detector.score_clip(v, shapes.caption(s)).motion)
             for v, s in zip(videos, specs))


def main(argv):
  del argv
  pipe, specs = straight_clips(FLAGS.bundle, FLAGS.mixture, FLAGS.num_clips)
  temporal = pipe.geometry.temporal
  truths = [shapes.render_clip(s) for s in specs]
  # One call path for both, with the bundle's sampler steps and guidance; a video's noise is its index's.
  videos = sampling.generate(pipe, [(shapes.caption(s), s.num_frames, s.height, s.width) for s in specs],
                             seed=FLAGS.seed)
  from_frame = sampling.generate(pipe, [sampling.image_prompt(pipe, shapes.caption(s), v[0], s.num_frames,
                                                             s.height, s.width) for s, v in zip(specs, truths)],
                                 seed=FLAGS.seed)
  rows = {"generated": [], "truth": []}
  for spec, video, truth in zip(specs, videos, truths):
    rows["generated"].append(step_sizes(axis_track(video, spec), temporal))
    rows["truth"].append(step_sizes(axis_track(truth, spec), temporal))
  out = {"bundle": FLAGS.bundle, "clips": len(specs), "mixture": FLAGS.mixture,
         "motion_read_right": {"from_text": motion_hits(videos, specs),
                               "from_true_first_frame": motion_hits(from_frame, specs),
                               "truth": motion_hits(truths, specs)}}
  for name, r in rows.items():
    r = np.asarray(r)
    out[name] = {"inside_latent_frames": float(np.nanmean(r[:, 0])),
                 "across_latent_frames": float(np.nanmean(r[:, 1]))}
  print(json.dumps(out))


if __name__ == "__main__":
  define_flags()
  app.run(main)
