"""When and where the sampler places the object: the data estimate along the sampled trajectory.

    python -m sora_jax.bench.sample_trajectory --bundle runs/demo/bundle [--mixture demo] [--num_clips 24]
        [--every 3] [--guidance G] [--out F.json]

Samples the first `num_clips` one-object straight-motion test clips of a Shapes mixture
(evaluate.straight_specs, as bench.motion_tracks) with the bundle's sampler, and keeps the sampler's data
estimate x0 (the guided prediction of the clean latents it steps towards) after every `every`-th step and the
last. Each estimate is decoded and the object tracked along its motion axis (motion_tracks.axis_track),
which gives per step:
- t: the diffusion time the step starts from (mean over the clips: the time shift depends on a clip's size);
- found: the fraction of frames in which the prompted object's colour is tracked;
- place error: the mean |centroid| distance, in pixels, from where the finished sample puts it, over
  frames tracked in both: how far the place still moves after this step (the place is decided where it
  falls to the finished jitter);
- inside / across: the mean centroid step inside latent frames and across their boundaries
  (motion_tracks.step_sizes; truth about 1.9 px each at the demo's speed): the latent frames' disagreement;
- speed: the least-squares slope of the track, in pixels a frame, signed so that the caption's direction
  is positive (mean over the clips; truth about 1.9), and `ahead`: the clips whose slope is positive;
- read right: clips whose estimate the detector reads as moving as the caption says.
The finished sample follows, then the ground-truth renders for reference. A DiT that places the object early and only refines it shows a
place error that falls to a few pixels while t is still high; one that keeps moving the object shows the
error falling only as t reaches 0, and its across-steps say whether the latent frames settle apart.
"""
from __future__ import annotations

import json

from absl import app, flags
import numpy as np

from sora_jax import detector
from sora_jax import sampling
from sora_jax.bench import motion_tracks
from sora_jax.data import shapes

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("bundle", None, "inference bundle")
  flags.DEFINE_string("mixture", "demo", "Shapes mixture whose test split gives the prompts")
  flags.DEFINE_integer("num_clips", 24, "clips to sample", lower_bound=1)
  flags.DEFINE_integer("every", 3, "keep the data estimate after every N-th step (and the last)", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_float("guidance", None, "CFG scale (default: the bundle config's sample.guidance)")
  flags.DEFINE_string("out", "", "also write the rows as JSON here")


def trajectory(pipe, specs: list[shapes.ClipSpec], *, every: int, seed: int = 0,
               guidance: float | None = None) -> list[dict]:
  """The rows described in the module docstring, one per kept step, the finished sample last."""
  steps = int(pipe.sample_setting("steps", None, 30))
  kept = sorted({k for k in range(steps) if (k + 1) % every == 0} | {steps - 1})
  estimates: dict[int, dict[int, np.ndarray]] = {k: {} for k in kept}

  def keep(k, x0s):
    if k in estimates:
      estimates[k].update(x0s)

  reqs = [(shapes.caption(s), s.num_frames, s.height, s.width) for s in specs]
  final = sampling.sample_latents(pipe, reqs, seed=seed, guidance=guidance, on_step=keep)
  temporal = pipe.geometry.temporal
  times = [sampling.time_schedule(steps, pipe.geometry.num_tokens(s.num_frames, s.height, s.width),
                                  pipe.shift_fn, grid=pipe.time_grid) for s in specs]

  def measures(latents, t, last, decode=pipe.decode):
    tracks, jitter, speeds, right = [], [], [], 0
    for z, spec, end in zip(latents, specs, last):
      frames = decode(z)[:spec.num_frames]
      track = motion_tracks.axis_track(frames, spec)
      speeds.append(signed_speed(track, spec))
      tracks.append(track)
      jitter.append(motion_tracks.step_sizes(track, temporal))
      right += bool(detector.score_clip(frames, shapes.caption(spec)).motion)
    found = float(np.mean([np.isfinite(tr).mean() for tr in tracks]))
    err = [np.abs(tr - e)[np.isfinite(tr - e)] for tr, e in zip(tracks, last)] if last[0] is not None else []
    err = np.concatenate(err) if err else np.zeros(0)
    jitter = np.asarray(jitter)
    return {"t": float(t), "found": found, "place_error": float(err.mean()) if err.size else None,
            "inside": float(np.nanmean(jitter[:, 0])), "across": float(np.nanmean(jitter[:, 1])),
            "speed": float(np.nanmean(speeds)), "ahead": int(np.sum(np.asarray(speeds) > 0)),
            "read_right": int(right), "tracks": tracks}

  end = measures(final, 0.0, [None] * len(specs))
  rows = []
  for k in kept:
    latents = [estimates[k][i] for i in range(len(specs))]
    row = measures(latents, np.mean([tt[k] for tt in times]), end["tracks"])
    rows.append({"step": k + 1, **row})
  rows.append({"step": "sample", **end, "place_error": 0.0})
  truth = measures([shapes.render_clip(s) for s in specs], 0.0, [None] * len(specs), decode=lambda v: v)
  rows.append({"step": "truth", **truth})
  for r in rows:
    del r["tracks"]
  return rows


def signed_speed(track: np.ndarray, spec: shapes.ClipSpec) -> float:
  """The track's least-squares slope (pixels a frame), positive in the caption's direction; NaN with
  fewer than 3 tracked frames."""
  ok = np.isfinite(track)
  if ok.sum() < 3:
    return np.nan
  slope = np.polyfit(np.flatnonzero(ok).astype(np.float64), track[ok], 1)[0]
  return float(-slope if spec.objects[0].motion in ("moving left", "moving up") else slope)


def format_rows(rows: list[dict]) -> str:
  lines = ["| after step | t | found | place error (px) | inside | across | speed | ahead | read right |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    pe = "" if r["place_error"] is None else f"{r['place_error']:.2f}"
    lines.append(f"| {r['step']} | {r['t']:.3f} | {r['found']:.2f} | {pe} | {r['inside']:.2f} | "
                 f"{r['across']:.2f} | {r['speed']:.2f} | {r['ahead']} | {r['read_right']} |")
  return "\n".join(lines)


def main(argv):
  del argv
  pipe, specs = motion_tracks.straight_clips(FLAGS.bundle, FLAGS.mixture, FLAGS.num_clips)
  rows = trajectory(pipe, specs, every=FLAGS.every, seed=FLAGS.seed, guidance=FLAGS.guidance)
  print(format_rows(rows))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"bundle": FLAGS.bundle, "mixture": FLAGS.mixture, "clips": len(specs), "rows": rows}, f,
                indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
