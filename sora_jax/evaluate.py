"""Evaluates an inference bundle on the Shapes benchmark and writes a report that opens offline.

    python -m sora_jax.evaluate --bundle runs/demo/bundle --out_dir runs/demo/eval \
        [--num_prompts 64] [--vae_clips 32] [--denoise_clips 32] [--seed 0] [--steps 30] [--guidance 4] \
        [--data_dir ingested_tfds_dir --data_split test] [--workdir runs/demo] [--learning_curve J]

1. VAE: PSNR and SSIM of reconstructions (encoder mean, decoded) of `vae_clips` held-out Shapes clips
   (test split, rendered without noise), and of the first clips of an ingested video data set when
   `--data_dir` is given (cropped to the VAE's grid). Means come with 95% bootstrap intervals.
2. Generation: the first `num_prompts` clips of the Shapes test split (half of them show a held-out
   composition) give captions and sizes; the bundle generates them (sampling.generate) and the detector
   (sora_jax/detector.py) scores colour, motion, persistence, shot consistency and shape with 95% Wilson
   intervals, over all clips and by group: seen / held-out compositions, images, videos, long clips
   (>= 65 frames), two objects, cuts, videos by motion kind (straight, bouncing, still), and prompts by
   the colours of their objects. The same detector on the ground-truth renders of the same specs is
   reported next to them, as the ceiling.
3. Continuous measures (binary scores on 64 prompts carry +-15-point intervals, too wide to see the
   effect of one change), with 95% bootstrap intervals over clips:
   - blobs per frame: on the prompts with one object and no cut, the components per frame that the
     detector would take for an object (detector.object_blob_counts), averaged over frames, then clips;
     for the generated videos, the ground-truth renders (1.0) and the VAE's reconstructions of step 1;
   - object-token error: the first `denoise_clips` test clips, rendered, encoded by the bundle's VAE,
     noised at t = 0.7 and 0.9 by the config's objective with noise fixed by the seed; the mean squared
     error of the DiT's clean-latent estimate (caption given, guidance 1) on object tokens
     (diffusion.object_tokens), beside background tokens and a unit-variance shrinkage baseline.
   - caption reading: the same error on the first `denoise_clips` one-object straight-motion test clips,
     with the direction word, then the colour word swapped (caption_reading): the error's increase says
     whether the DiT reads the word (motion cannot beat chance while the direction is not read).
4. Report: out_dir/report.html with metric tables, sample grids (first, middle, last frame of each
   generated video next to its ground truth), VAE reconstructions, and training curves from
   <workdir>/{vae,dit}/metrics.jsonl (the workdir defaults to the one the bundle was exported from).
   out_dir/metrics.json holds every number and the per-clip verdicts (the continuous measures under
   `blobs_per_frame`, `object_token_error` and `caption_reading`, with their settings). A learning curve
   (sora_jax/bench/learning_curve.py) in out_dir, or given by --learning_curve, is shown too.

Settings come from the flags, else the bundle config's `eval` section, else the defaults below. The
command ends by printing the headline metrics and the report's path.

Multi-host (launched as `train` is, docs/pods.md): the VAE clips, the generation chunks and the detector's
clips are split between the processes (distributed.map_shared), each working on its own devices, and
process 0 writes metrics.json, the PNGs and the report. A prompt's noise depends only on (seed, its
index), so the scores are the same on any number of processes.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import numpy as np

from sora_jax import atomic
from sora_jax import bundle as bundle_lib
from sora_jax import config as config_lib
from sora_jax import detector
from sora_jax import distributed
from sora_jax import diffusion
from sora_jax import metrics
from sora_jax import report
from sora_jax import sampling
from sora_jax.data import shapes

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs (entry points share names like --workdir)."""
  flags.DEFINE_string("bundle", None, "the inference bundle to evaluate")
  flags.DEFINE_string("out_dir", None, "where metrics.json, report.html and the PNGs go")
  flags.DEFINE_integer("num_prompts", None, "Shapes test prompts to generate and score", lower_bound=1)
  flags.DEFINE_integer("vae_clips", None, "held-out Shapes clips for VAE PSNR/SSIM", lower_bound=1)
  flags.DEFINE_integer("seed", None, "sampling seed (and data set seed of the prompts)", lower_bound=0)
  flags.DEFINE_integer("steps", None, "sampler steps (default: the bundle config's sample.steps)",
                       lower_bound=1)
  flags.DEFINE_float("guidance", None, "CFG scale (default: the bundle config's sample.guidance)",
                     lower_bound=0.0)
  flags.DEFINE_string("mixture", None, "Shapes size mixture of the prompts (default: data.mixture)")
  flags.DEFINE_string("data_dir", None, "an ingested video data set (tfds dir) for VAE metrics")
  flags.DEFINE_string("data_split", None, "its split")
  flags.DEFINE_string("workdir", None, "training runs for the curves (default: the bundle's source)")
  flags.DEFINE_string("compare_bundle", None, "another export of the same run (e.g. --dtype bfloat16): "
                      "sample the first compare_prompts prompts with it too and report pixel differences")
  flags.DEFINE_integer("compare_prompts", 8, "prompts sampled with --compare_bundle", lower_bound=1)
  flags.DEFINE_integer("denoise_clips", None, "Shapes test clips for the DiT's object-token error",
                       lower_bound=1)
  flags.DEFINE_string("learning_curve", None, "a learning_curve.json to show in the report (default: "
                      "out_dir/learning_curve.json if present)")


DEFAULTS = dict(num_prompts=64, vae_clips=32, seed=0, steps=0, guidance=0.0, mixture="", data_dir="",
                data_split="test", chunk=16, denoise_clips=32)
LONG_CLIP = 65  # frames: "persistence over long clips" is reported on clips at least this long


def settings(cfg, **overrides) -> dict:
  """Flags (non-None overrides) > the config's `eval` section > DEFAULTS."""
  section = cfg.get("eval", None) if hasattr(cfg, "get") else None
  out = {}
  for k, default in DEFAULTS.items():
    v = overrides.get(k)
    if v is None and section is not None:
      v = section.get(k, None)
    out[k] = default if v is None else type(default)(v)
  if not out["mixture"]:
    out["mixture"] = str(config_lib.complete(cfg).data.mixture) if hasattr(cfg, "data") else "demo"
  return out


# ---------------------------------------------------------------------------------------------- VAE
def bootstrap_mean(values: Sequence[float], *, seed: int = 0, draws: int = 2000) -> dict:
  """Mean of `values` with a 95% percentile-bootstrap interval."""
  v = np.asarray([x for x in values if math.isfinite(x)], np.float64)
  if v.size == 0:
    return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
  idx = np.random.default_rng(seed).integers(0, v.size, (draws, v.size))
  means = v[idx].mean(axis=1)
  return {"mean": float(v.mean()), "ci95": [float(np.percentile(means, 2.5)),
                                            float(np.percentile(means, 97.5))], "n": int(v.size)}


def fit_to_vae(frames: np.ndarray, temporal: int, spatial: int, max_frames: int = 481) -> np.ndarray:
  """The largest 1 + temporal*k frames and centre crop on the spatial grid that fit `frames`."""
  T, H, W = frames.shape[:3]
  t = 1 + (min(T, max_frames) - 1) // temporal * temporal
  h, w = H // spatial * spatial, W // spatial * spatial
  if h == 0 or w == 0:
    raise ValueError(f"a {H}x{W} video is smaller than the VAE's {spatial}-pixel grid")
  y0, x0 = (H - h) // 2, (W - w) // 2
  return frames[:t, y0:y0 + h, x0:x0 + w]


def vae_scores(pipe, clips: Sequence[tuple[str, np.ndarray]], *, seed: int = 0,
               specs: Sequence[shapes.ClipSpec] | None = None) -> dict:
  """PSNR/SSIM of the VAE's reconstructions of (name, uint8 video) clips; keeps a few for the report.

  With `specs` (the Shapes specs the clips were rendered from) the detector also scores each
  reconstruction against its spec: `detector`, the rates by group, is the ceiling that a DiT generating
  in this VAE's latent space can reach (what the VAE's round trip alone loses); `blobs_per_frame` is the
  same ceiling for the continuous measure (`blobs_per_frame`, over the one-object clips), and `latents`
  are the clips' normalised latents (which object_token_error need not encode again).
  """
  g = pipe.geometry

  def one(item):
    k, (name, frames) = item
    x = fit_to_vae(np.asarray(frames, np.uint8), g.temporal, g.spatial)
    z = pipe.encode(x)
    y = pipe.decode(z)
    record = {"name": name, "frames": int(x.shape[0]), "size": [int(x.shape[1]), int(x.shape[2])],
              "psnr": metrics.psnr(x, y), "ssim": metrics.ssim(x, y)}
    read = None
    if specs is not None:
      if x.shape != np.shape(frames):
        raise ValueError(f"Shapes clip {name!r} of shape {np.shape(frames)} is off the VAE's grid "
                         f"({g.temporal} frames, {g.spatial} px): its reconstruction cannot be scored")
      read = detector.score_clip(y, specs[k].labels())
      record["blobs_per_frame"] = blobs_per_frame(y) if is_one_object(specs[k]) else None
    return record, ((name, x, y) if k < 8 else None), read, (z if specs is not None else None)

  done = distributed.map_shared(one, list(enumerate(clips)))
  per_clip = [record for record, _, _, _ in done]
  examples = [ex for _, ex, _, _ in done if ex is not None]
  out = {"psnr": bootstrap_mean([c["psnr"] for c in per_clip], seed=seed),
         "ssim": bootstrap_mean([c["ssim"] for c in per_clip], seed=seed),
         "clips": per_clip, "examples": examples}
  if specs is not None:
    out["detector"] = grouped(specs, [read for _, _, read, _ in done])
    out["latents"] = [z for _, _, _, z in done]
    out["blobs_per_frame"] = bootstrap_mean([c["blobs_per_frame"] for c in per_clip
                                             if c["blobs_per_frame"] is not None], seed=seed)
  return out


def ingested_clips(data_dir: str, split: str, count: int) -> list[tuple[str, np.ndarray]]:
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
  src = sources.video_source(data_dir, split)
  return [(str(src[i].get("caption", f"clip {i}")), np.asarray(src[i]["video"]))
          for i in range(min(count, len(src)))]


# ---------------------------------------------------------------------------------------- generation
def test_prompts(num: int, *, seed: int, mixture: str) -> list[shapes.ClipSpec]:
  """The first `num` specs of the Shapes test split: the evaluation's prompts and sizes."""
  return [shapes.sample_spec("test", i, seed, mixture) for i in range(num)]


def is_held_out(spec: shapes.ClipSpec) -> bool:
  return not spec.is_image and any((o.colour, o.shape, o.motion) in shapes.HELD_OUT for o in spec.objects)


def _all_motions(spec: shapes.ClipSpec, kinds: Sequence[str]) -> bool:
  return not spec.is_image and all(o.motion in kinds for o in spec.objects)


GROUPS: dict[str, Callable[[shapes.ClipSpec], bool]] = {
    "all": lambda s: True,
    "seen compositions": lambda s: not is_held_out(s),
    "held-out compositions": is_held_out,
    "images": lambda s: s.is_image,
    "videos": lambda s: not s.is_image,
    f"long clips (>= {LONG_CLIP} frames)": lambda s: s.num_frames >= LONG_CLIP,
    "two objects": lambda s: len(s.objects) == 2,
    "with a cut": lambda s: bool(s.cut_frame),
    # By motion kind (videos whose objects all move so): jitter reads as bouncing, so a model that draws
    # no motion still passes some bouncing prompts; straight motions are the ones it must carry.
    "straight motions": lambda s: _all_motions(s, shapes.STRAIGHT_MOTIONS),
    "bouncing motions": lambda s: _all_motions(s, shapes.BOUNCING_MOTIONS),
    "still objects": lambda s: _all_motions(s, ("still",)),
    # By colour (prompts with an object of it): a colour the VAE puts close to its background is the one
    # the DiT loses (bench.latent_contrast).
    **{f"{c} objects": (lambda s, c=c: any(o.colour == c for o in s.objects)) for c in shapes.COLOURS},
}


def grouped(specs: Sequence[shapes.ClipSpec], scores: Sequence[detector.ClipScore]) -> dict:
  """{group: {metric: Rate.to_dict()}} over the groups that hold at least one clip."""
  out = {}
  for name, member in GROUPS.items():
    picked = [sc for s, sc in zip(specs, scores) if member(s)]
    if picked:
      out[name] = {m: r.to_dict() for m, r in detector.summarize(picked).items()}
  return out


def generate_videos(bundle, specs: Sequence[shapes.ClipSpec], *, seed: int, steps: int, guidance: float,
                    chunk: int = 16, generate: Callable | None = None) -> list[np.ndarray | None]:
  """One uint8 video per spec from its caption and size (None where the model cannot make that size).

  Requests go in chunks (progress lines) with `index_offset`, so each video's noise depends only on
  (seed, its index), not on the chunking.
  """
  if generate is None:
    generate = sampling.generate
  kw = {}
  if steps:
    kw["steps"] = steps
  if guidance:
    kw["guidance"] = guidance
  out: list[np.ndarray | None] = [None] * len(specs)
  start = time.time()
  # Packed rows widen to the longest request they hold: long clips go alone, the rest in chunks of
  # consecutive indices (index_offset keeps every video's noise that of its index either way).
  parts, run = [], []
  for i, s in enumerate(specs):
    if s.num_frames >= LONG_CLIP:
      parts.append([i])
      continue
    if run and (run[-1] != i - 1 or len(run) == chunk):
      parts.append(run)
      run = []
    run.append(i)
  parts += [run] if run else []
  parts.sort()

  def one(part):
    c0 = part[0]
    reqs = [(shapes.caption(specs[i]), specs[i].num_frames, specs[i].height, specs[i].width) for i in part]
    try:
      videos = generate(bundle, reqs, seed=seed, index_offset=c0, **kw)
    except ValueError as e:  # a size off this model's grid: generate the chunk one by one
      print(f"[eval] chunk at {c0}: {e}; retrying one by one", flush=True)
      videos = []
      for i, r in zip(part, reqs):
        try:
          videos.append(generate(bundle, [r], seed=seed, index_offset=i, **kw)[0])
        except ValueError as e1:
          print(f"[eval] prompt {i} skipped: {e1}", flush=True)
          videos.append(None)
    print(f"[eval] generated prompts {part[0]}-{part[-1]} of {len(specs)} ({time.time() - start:.0f}s)",
          flush=True)
    return [None if v is None else np.asarray(v, np.uint8) for v in videos]

  # Parts are split between the processes (one each per round); every process gets every video.
  for part, videos in zip(parts, distributed.map_shared(one, parts)):
    for i, v in zip(part, videos):
      out[i] = v
  return out


def generation_scores(specs: Sequence[shapes.ClipSpec], videos: Sequence[np.ndarray | None], *,
                      seed: int = 0) -> dict:
  """Detector scores of generated videos (by group), of the ground-truth renders, and chance levels;
  `blobs_per_frame` of both on the one-object prompts (bootstrap intervals drawn with `seed`)."""
  kept = [(s, v) for s, v in zip(specs, videos) if v is not None]

  def one(sv):
    s, v = sv
    truth = shapes.render_clip(s)
    blobs = (blobs_per_frame(v), blobs_per_frame(truth)) if is_one_object(s) else (None, None)
    return detector.score_clip(v, s.labels()), detector.score_clip(truth, s.labels()), blobs
  done = distributed.map_shared(one, kept)
  scores, truth = [d[0] for d in done], [d[1] for d in done]
  per_clip = []
  for (s, v), sc, (_, _, (blobs, _)) in zip(kept, scores, done):
    per_clip.append({"caption": shapes.caption(s), "num_frames": s.num_frames, "size": [s.height, s.width],
                     "held_out": is_held_out(s), **{m: getattr(sc, m) for m in detector.METRICS},
                     "blobs_per_frame": blobs,
                     "read": {"colours": list(sc.reading.colours),
                              "objects": [dataclasses.asdict(o) for o in sc.reading.objects],
                              "cut_frame": sc.reading.cut_frame}})
  blobs = {name: bootstrap_mean([d[2][i] for d in done if d[2][i] is not None], seed=seed)
           for i, name in enumerate(("generated", "ground_truth"))}
  return {"groups": grouped([s for s, _ in kept], scores),
          "ground_truth": grouped([s for s, _ in kept], truth),
          "chance": detector.chance_level([s.labels() for s, _ in kept]),
          "motion_read": detector.motion_readings([s.labels() for s, _ in kept], scores),
          "skipped": len(specs) - len(kept), "clips": per_clip, "blobs_per_frame": blobs,
          "_scores": scores, "_kept": kept}


# ----------------------------------------------------------------------------------- continuous measures
# Binary detector scores on 32-64 prompts carry +-15-point intervals: too wide to see one change's effect.
# Two continuous measures go with every evaluation: the blobs per frame of one-object prompts (pixels),
# and the DiT's clean-latent error on object tokens at high noise (latents, no sampling).
DENOISE_TIMES = (0.7, 0.9)


def is_one_object(spec: shapes.ClipSpec) -> bool:
  """A prompt with one object and no cut: every frame of its video should show exactly one object."""
  return len(spec.objects) == 1 and not spec.cut_frame


def blobs_per_frame(video: np.ndarray) -> float:
  """Mean over frames of the components the detector would take for an object (`detector.
  object_blob_counts`): 1 for a render of one object; more when it falls apart or multiplies; less when
  it vanishes."""
  return float(detector.object_blob_counts(np.asarray(video, np.uint8)).mean())


def _jitted(model):
  """`model` (the DiT, or any callable with its signature) compiled once per input shape."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if not isinstance(model, nnx.Module):
    return model
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, *args, **kw: nnx.merge(graphdef, state)(*args, **kw))
  return lambda *args, **kw: run(state, *args, **kw)


def denoise_errors(dit, cfg, batch: dict, eps: np.ndarray, *, num_segments: int,
                   times: Sequence[float] = DENOISE_TIMES, text_drop: float = 0.0) -> dict:
  """Per-token squared errors (mean over D) of the DiT's clean-latent estimate on one packed batch.

  batch: `tokens` (clean normalised latents x0 [B, L, D]), positions, segment_ids, text_tokens,
  text_segment_ids. At each t every segment is noised with `eps` as cfg.diffusion's objective does
  (diffusion.noisy; rectified flow: x_t = (1 - t) x0 + t eps), the DiT predicts with its caption (unless
  `text_drop` hides it), and diffusion.predict_x0 turns the prediction into x0_hat. Returns
  {"object": bool [B, L] (diffusion.object_tokens), "valid": bool [B, L], t: {"model": [B, L],
  "shrinkage": [B, L]}}, where `shrinkage` is a model that knows only the latents' unit variance:
  x0_hat = a x_t / (a^2 + s^2) for x_t = a x0 + s eps.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sora_jax import diffusion  # pylint: disable=g-import-not-at-top
  x0 = jnp.asarray(batch["tokens"], jnp.float32)
  seg = jnp.asarray(batch["segment_ids"], jnp.int32)
  eps = jnp.asarray(eps, jnp.float32)
  b = x0.shape[0]
  forward = _jitted(dit)
  inputs = (jnp.asarray(batch["positions"]), seg)
  text = (jnp.asarray(batch["text_tokens"]), jnp.asarray(batch["text_segment_ids"]))
  out: dict[Any, Any] = {"object": np.asarray(diffusion.object_tokens(x0, seg, num_segments)) > 0,
                         "valid": np.asarray(seg) > 0}
  for t in times:
    t_tok = jnp.full(seg.shape, t, jnp.float32)
    x_t, _ = diffusion.noisy(x0, eps, t_tok, cfg)
    pred = forward(x_t, *inputs, jnp.full((b, num_segments), t, jnp.float32), *text,
                   text_drop=jnp.full((b, num_segments), text_drop, jnp.float32))
    x0_hat = diffusion.predict_x0(x_t, jnp.asarray(pred, jnp.float32), t_tok, cfg)
    # a and s of x_t = a x0 + s eps, read off the objective itself (x_t is linear in x0 and eps).
    mix = lambda u, v: float(diffusion.noisy(jnp.float32(u), jnp.float32(v), jnp.float32(t), cfg)[0][0])
    a, s = mix(1, 0), mix(0, 1)
    out[t] = {"model": np.asarray(jnp.mean(jnp.square(x0_hat - x0), axis=-1)),
              "shrinkage": np.asarray(jnp.mean(jnp.square(x_t * a / (a * a + s * s) - x0), axis=-1))}
  return out


def object_token_error(pipe, specs: Sequence[shapes.ClipSpec], *, seed: int = 0,
                       times: Sequence[float] = DENOISE_TIMES, rows_per_call: int = 8,
                       latents: Sequence[np.ndarray] | None = None) -> dict:
  """The DiT's clean-latent error on object tokens of held-out clips, at each diffusion time in `times`:
  `per_clip_object_errors`' clip means, each with a 95% bootstrap interval."""
  setup, per_t = per_clip_object_errors(pipe, specs, seed=seed, times=times, rows_per_call=rows_per_call,
                                        latents=latents)
  return {"settings": setup,
          "by_t": {f"{t:g}": {"object": bootstrap_mean(v["model"], seed=seed),
                              "background": bootstrap_mean(v["background"], seed=seed),
                              "shrinkage_object": bootstrap_mean(v["shrinkage"], seed=seed)}
                   for t, v in per_t.items()}}


def per_clip_object_errors(pipe, specs: Sequence[shapes.ClipSpec], *, seed: int = 0,
                           times: Sequence[float] = DENOISE_TIMES, rows_per_call: int = 8,
                           latents: Sequence[np.ndarray] | None = None,
                           captions: Sequence[str] | None = None) -> tuple[dict, dict]:
  """(settings, {t: {"model", "shrinkage": [a clip's mean error on its object tokens, one per clip with
  object tokens], "background": [its other tokens' mean, where it has any]}}).

  Each spec is rendered as the evaluator does (no noise), encoded with the pipeline's VAE into normalised
  latents and patchified with its patch; the clips are packed into rows as sampling packs requests, and
  clip i's noise is draw 0 of `sampling.request_key(seed, i)`, so two bundles with the same latent shapes
  are compared on the same noise. `denoise_errors` gives per-token errors with the caption (guidance 1,
  no text drop); a clip's error is the mean over its object tokens (its background tokens, and the
  shrinkage baseline's, likewise), then the mean over clips comes with a 95% bootstrap interval. Clips
  without object tokens, and sizes off the model's grid, are left out (counted). `latents`: the
  normalised latents of the first specs' renders when they are at hand (vae_scores encodes the same clips).
  `captions`: the text each spec's clip is given instead of its own caption (bench.caption_reading).
  """
  from sora_jax import patching  # pylint: disable=g-import-not-at-top
  g = pipe.geometry
  known = list(latents or [])
  picked = []
  for i, s in enumerate(specs):
    try:
      g.latent_shape(s.num_frames, s.height, s.width)
      picked.append((s, known[i] if i < len(known) else None,
                     shapes.caption(s) if captions is None else captions[i]))
    except ValueError:
      pass
  setup = {"clips": len(specs), "split": "test", "seed": seed, "times": list(times),
           "objective": str(pipe.cfg.diffusion.objective), "guidance": 1.0, "text_drop": 0.0,
           "object_threshold": 1.0, "off_grid": len(specs) - len(picked)}
  per_t = {t: {"model": [], "background": [], "shrinkage": []} for t in times}
  if not picked:
    return setup, per_t
  latents = distributed.map_shared(lambda sz: pipe.encode(shapes.render_clip(sz[0])) if sz[1] is None else sz[1],
                                   picked)
  reqs = [sampling.Request(c, s.num_frames, s.height, s.width) for s, _, c in picked]
  row_len = int(pipe.sample_setting("row_len", None, 0) or pipe.cfg.data.seq_len)
  packed = sampling.pack_requests(reqs, g, [pipe.text(r.caption) for r in reqs], seed=seed, steps=1,
                                  row_len=row_len, frame_share=diffusion.frame_share(pipe.cfg))
  x0 = np.zeros_like(packed.noise)
  for z, p in zip(latents, packed.placements):
    x0[p.row, p.start:p.start + p.num_tokens] = patching.patchify(np.asarray(z, np.float32), g.patch)[0]
  batch = {**packed.batch, "tokens": x0}
  num_segments = max(p.segment for p in packed.placements)
  starts = list(range(0, packed.num_rows, rows_per_call))
  done = distributed.map_shared(
      lambda r0: denoise_errors(pipe.dit, pipe.cfg, {k: v[r0:r0 + rows_per_call] for k, v in batch.items()},
                                packed.noise[r0:r0 + rows_per_call], num_segments=num_segments, times=times),
      starts)
  used = 0
  for p in packed.placements:
    part = done[p.row // rows_per_call]
    where = (p.row % rows_per_call, slice(p.start, p.start + p.num_tokens))
    obj = part["object"][where]
    if not obj.any():
      continue
    used += 1
    for t in times:
      per_t[t]["model"].append(float(part[t]["model"][where][obj].mean()))
      per_t[t]["shrinkage"].append(float(part[t]["shrinkage"][where][obj].mean()))
      if (~obj).any():
        per_t[t]["background"].append(float(part[t]["model"][where][~obj].mean()))
  setup["without_object_tokens"] = len(picked) - used
  return setup, per_t


def straight_specs(mixture: str, n: int, temporal: int) -> list[shapes.ClipSpec]:
  """The first n test clips of `mixture` with one object moving in a straight line, uncut, of at least
  two latent frames (`temporal` frames a latent frame): the clips whose motion a track can measure."""
  def straight(s):
    return (len(s.objects) == 1 and s.objects[0].motion in shapes.STRAIGHT_MOTIONS and not s.cut_frame
            and s.num_frames > temporal)
  return shapes.first_specs(mixture, n, straight, "one-object straight-motion clips")


# Each word's stand-in when its kind is swapped in a caption: another word of the same kind, never itself.
CAPTION_SWAPS = {
    "direction": {"left": "right", "right": "left", "up": "down", "down": "up"},
    "colour": {"red": "blue", "blue": "green", "green": "yellow", "yellow": "white", "white": "red"},
    "shape": {"circle": "square", "square": "triangle", "triangle": "circle"},
}


def swap_words(caption: str, kind: str) -> str:
  """`caption` with every word of `kind` (CAPTION_SWAPS) replaced by its stand-in."""
  table = CAPTION_SWAPS[kind]
  return re.sub(r"\b(" + "|".join(table) + r")\b", lambda m: table[m.group(1)], caption)


def paired_increase(true: Sequence[float], swapped: Sequence[float], *, seed: int = 0,
                    draws: int = 2000) -> dict:
  """mean(swapped) / mean(true) - 1 over paired per-clip values, with a 95% bootstrap interval over clips."""
  true, swapped = np.asarray(true, np.float64), np.asarray(swapped, np.float64)
  if true.size == 0:
    return {"increase": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
  idx = np.random.default_rng(seed).integers(0, true.size, (draws, true.size))
  boot = swapped[idx].mean(1) / true[idx].mean(1) - 1.0
  return {"increase": float(swapped.mean() / true.mean() - 1.0),
          "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))], "n": int(true.size)}


def caption_reading(pipe, specs: Sequence[shapes.ClipSpec], *, kinds: Sequence[str] = tuple(CAPTION_SWAPS),
                    times: Sequence[float] = DENOISE_TIMES, seed: int = 0) -> dict:
  """Which words of the caption the DiT reads: its object-token error (`per_clip_object_errors`: the same
  latents and noise) with each kind of word swapped (CAPTION_SWAPS), against the true caption.

  Returns {"settings", "true": {t: mean error}, kind: {t: {"error", "increase", "ci95", "n"}}}: a DiT that uses
  a word predicts worse when it is wrong; an increase whose interval holds 0 says the word is ignored.
  """
  latents = distributed.map_shared(lambda s: pipe.encode(shapes.render_clip(s)), list(specs))
  errors = {}
  for kind in ("true",) + tuple(kinds):
    captions = [shapes.caption(s) if kind == "true" else swap_words(shapes.caption(s), kind) for s in specs]
    setup, per_t = per_clip_object_errors(pipe, specs, seed=seed, times=times, latents=latents,
                                          captions=captions)
    errors[kind] = {t: per_t[t]["model"] for t in times}
  out = {"settings": {**setup, "kinds": list(kinds)},
         "true": {f"{t:g}": float(np.mean(errors["true"][t])) if errors["true"][t] else None for t in times}}
  for kind in kinds:
    out[kind] = {f"{t:g}": {"error": float(np.mean(errors[kind][t])) if errors[kind][t] else None,
                            **paired_increase(errors["true"][t], errors[kind][t], seed=seed)} for t in times}
  return out


# -------------------------------------------------------------------------------------------- report
def _curves(workdir: str | None, out_dir: str) -> list[tuple[str, str]]:
  out = []
  if not workdir:
    return out
  for run in ("vae", "dit"):
    path = os.path.join(workdir, run, "metrics.jsonl")
    if not os.path.isfile(path):
      continue
    records = metrics.read_metrics(path)
    keys = sorted({k for r in records for k, v in r.items()
                   if "loss" in k and not k.startswith("compile/") and isinstance(v, (int, float))})
    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
    png = report.curve_png(os.path.join(out_dir, f"curves_{run}.png"), f"{run} training (step)", series,
                           log_y=True)
    if png:
      out.append((run, os.path.basename(png)))
  return out


def _mean_ci(m: dict | None, digits: int = 3, *, html_note: bool = False) -> str:
  """'1.023 [0.981, 1.070] (n=30)' for a bootstrap_mean dict; a dash when there is none."""
  if not m or not m.get("n"):
    return "&ndash;" if html_note else "-"
  lo, hi = m["ci95"]
  ci = f"[{lo:.{digits}f}, {hi:.{digits}f}] n={m['n']}"
  return f"{m['mean']:.{digits}f} " + (f"<span class=note>{ci}</span>" if html_note else f"{ci}")


def _blobs_line(b: dict) -> str:
  parts = [f"{name} {_mean_ci(b.get(key), 2)}" for key, name in
           (("generated", "generated"), ("ground_truth", "ground truth"), ("vae_reconstruction", "VAE"))
           if b.get(key)]
  return "blobs per frame, one-object prompts: " + "; ".join(parts)


def _denoise_line(o: dict) -> str:
  parts = [f"t={t} {_mean_ci(v['object'], 3)}" for t, v in o["by_t"].items()]
  return (f"DiT clean-latent error on object tokens ({o['settings']['clips']} test clips): "
          + ("; ".join(parts) or "no clip on the model's grid"))


def _increase(c: dict) -> str:
  return f"{c['increase']:+.1%} [{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}]"


def _reading_line(r: dict) -> str:
  parts = [f"{kind} swapped " + ", ".join(f"{_increase(c)} at t={t}" for t, c in r[kind].items())
           for kind in r["settings"]["kinds"]]
  return (f"DiT caption reading, object-token error with a word swapped ({r['settings']['clips']} straight "
          "clips): " + "; ".join(parts))


def continuous_tables(result: dict) -> str:
  """The report's tables of the continuous measures (blobs per frame, object-token error)."""
  out = []
  b = result.get("blobs_per_frame")
  if b:
    rows = [(label, _mean_ci(b.get(key), 3, html_note=True)) for key, label in
            (("generated", "generated videos"), ("ground_truth", "ground-truth renders (ceiling)"),
             ("vae_reconstruction", "VAE reconstructions of the first prompts' renders (ceiling through "
                                    "this VAE)"))]
    out.append("<table><tr><th>blobs per frame, prompts with one object and no cut</th><th>mean [95% "
               "bootstrap interval] clips</th></tr>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
                                                           for k, v in rows) + "</table>")
    out.append("<p class=note>Components the detector would take for an object (any palette colour, "
               "its presence rule), per frame, averaged over frames then clips: 1.0 is one intact object "
               "in every frame; fragments and extra objects raise it, lost objects lower it.</p>")
  o = result.get("object_token_error")
  if o and o["by_t"]:
    head = ("<table><tr><th>t</th><th>DiT, object tokens</th><th>DiT, background tokens</th>"
            "<th>unit-variance shrinkage, object tokens</th></tr>")
    body = "".join(f"<tr><td>{t}</td>" + "".join(f"<td>{_mean_ci(v[k], 3, html_note=True)}</td>" for k in
                                                 ("object", "background", "shrinkage_object")) + "</tr>"
                   for t, v in o["by_t"].items())
    st = o["settings"]
    out.append(head + body + "</table>" + (
        f"<p class=note>Mean squared error of the DiT's clean-latent estimate (normalised latent units, mean "
        f"over each clip's tokens, then over clips; 95% bootstrap intervals) on the first {st['clips']} "
        f"test clips, rendered, encoded by this bundle's VAE and noised by its {st['objective']} "
        f"objective with the noise of seed {st['seed']}; caption given, guidance 1. Object tokens are "
        f"more than {st['object_threshold']} (rms) from their clip's mean token. {st['off_grid']} clips off "
        f"the model's grid, {st.get('without_object_tokens', 0)} without object tokens.</p>"))
  r = result.get("caption_reading")
  if r:
    times = list(r["true"])
    head = "<table><tr><th>word swapped</th>" + "".join(f"<th>t = {t}</th>" for t in times) + "</tr>"
    body = "".join(f"<tr><td>{html.escape(kind)}</td>" + "".join(f"<td>{_increase(r[kind][t])}</td>" for t in times)
                   + "</tr>" for kind in r["settings"]["kinds"])
    out.append(head + body + "</table>" + (
        f"<p class=note>The same object-token error on the first {r['settings']['clips']} one-object "
        "straight-motion test clips, with one kind of word of each caption swapped for another of its kind: "
        "mean(swapped) / mean(true) - 1, 95% paired bootstrap interval over clips. An interval holding 0 says "
        "the DiT does not read that word.</p>"))
  return "".join(out)


# The learning curve's rates (sora_jax/bench/learning_curve.py): the detector's three on all prompts, and motion
# on the straight-motion prompts alone (GROUPS): jitter passes bouncing prompts, so the all-prompt motion rate
# hides whether a model carries an object along its path.
# name: (group, detector metric, column label).
CURVE_RATES = {"colour": ("all", "colour", "colour"), "motion": ("all", "motion", "motion"),
               "persistence": ("all", "persistence", "persistence"),
               "motion_straight": ("straight motions", "motion", "motion (straight)")}


def motion_read_table(readings: dict) -> str:
  """HTML table of detector.motion_readings: objects per (prompted, read) motion, the matches in bold."""
  cols = list(shapes.MOTIONS) + [detector.UNTRACKED]
  head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
  def cell(want, got, n):
    return f"<td><b>{n}</b></td>" if n and want == got else f"<td>{n or ''}</td>"
  rows = "".join(f"<tr><td>{html.escape(w)}</td>" + "".join(cell(w, c, r.get(c, 0)) for c in cols) + "</tr>"
                 for w, r in readings.items())
  jitter = sum(n for w, r in readings.items() if w not in shapes.BOUNCING_MOTIONS
               for c, n in r.items() if c in shapes.BOUNCING_MOTIONS)
  calm = sum(sum(r.values()) for w, r in readings.items() if w not in shapes.BOUNCING_MOTIONS)
  return (f"<table><tr><th>prompted / read</th>{head}</tr>{rows}</table><p class=note>Objects of the clips "
          f"whose motion is scored (rows: the caption's motion; columns: the detector's reading). Straight or "
          f"still prompts read as bouncing ({jitter} of {calm}) are tracks that turn back by more than "
          f"{100 * detector.TURN:.0f}% of the frame: objects that jitter. A bouncing prompt in a clip too short "
          f"to reach an edge also accepts a straight reading on its axis.</p>")


def learning_curve_html(curve: dict, png: str | None) -> str:
  """The learning curve's plot and table (sora_jax/bench/learning_curve.py writes `curve`)."""
  times = [f"{t:g}" for t in curve.get("times", [])]
  head = (["step", "DiT train FLOPs", *(label for _, _, label in CURVE_RATES.values()), "blobs per frame"]
          + [f"object-token error t={t}" for t in times])

  def cells(r):
    pct = report._pct  # pylint: disable=protected-access
    errors = r.get("object_token_error", {})
    return ([str(r["step"]), f"{r['train_flops']:.3g}" if r.get("train_flops") else "&ndash;"]
            + [pct(r.get(m)) for m in CURVE_RATES]
            + [_mean_ci(r.get("blobs_per_frame"), 2, html_note=True)]
            + [_mean_ci(errors.get(t), 3, html_note=True) for t in times])
  table = ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
           + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(r)) + "</tr>" for r in curve["rows"])
           + "</table>")
  return ((report.img(png, "learning curve") if png else "") + table
          + "<p class=note>Each row evaluates the DiT's EMA weights at one checkpoint of "
          f"{html.escape(str(curve.get('workdir', '')))} (same prompts, seed and VAE). Ground truth: "
          f"{_mean_ci(curve.get('blobs_ground_truth'), 2, html_note=True)} blobs per frame. FLOPs: the "
          "trainer's hand count of model FLOPs per step (metrics.jsonl) times the steps.</p>")


def _headline_rows(result: dict) -> list[tuple[str, str]]:
  rows = []
  gen = result.get("generation")
  if gen and "all" in gen["groups"]:
    for m in detector.METRICS:
      rows.append((f"{m} accuracy (all prompts)", report._pct(gen["groups"]["all"].get(m))))  # pylint: disable=protected-access
    held = gen["groups"].get("held-out compositions")
    if held:
      for m in ("colour", "motion"):
        rows.append((f"{m} accuracy (held-out compositions)", report._pct(held.get(m))))  # pylint: disable=protected-access
    longs = gen["groups"].get(f"long clips (>= {LONG_CLIP} frames)")
    if longs:
      rows.append(("persistence (long clips)", report._pct(longs.get("persistence"))))  # pylint: disable=protected-access
  b = result.get("blobs_per_frame") or {}
  for key, label in (("generated", "generated"), ("ground_truth", "ground truth")):
    if b.get(key):
      rows.append((f"blobs per frame, one-object prompts ({label})", _mean_ci(b[key], 2, html_note=True)))
  o = result.get("object_token_error")
  for t, v in (o or {}).get("by_t", {}).items():
    rows.append((f"DiT object-token error at t = {t}", _mean_ci(v["object"], 3, html_note=True)))
  r = result.get("caption_reading")
  for t, c in ((r or {}).get("direction") or {}).items():
    rows.append((f"DiT object-token error with the direction word swapped, t = {t}", _increase(c)))
  c = result.get("comparison")
  if c:
    rows.append((f"vs {c['dtype']} bundle: mean |pixel difference| (of 255)",
                 f"{c['mean_abs_diff']:.3f} <span class=note>p99 {c['p99_abs_diff']:.0f}, max "
                 f"{c['max_abs_diff']}; same detector verdicts {c['same_verdicts']}/{c['videos']}</span>"))
  for name in ("vae_shapes", "vae_ingested"):
    v = result.get(name)
    if v:
      rows.append((f"VAE PSNR ({v['label']})", f"{v['psnr']['mean']:.2f} dB <span class=note>"
                   f"[{v['psnr']['ci95'][0]:.2f}, {v['psnr']['ci95'][1]:.2f}] n={v['psnr']['n']}</span>"))
      rows.append((f"VAE SSIM ({v['label']})", f"{v['ssim']['mean']:.4f} <span class=note>"
                   f"[{v['ssim']['ci95'][0]:.4f}, {v['ssim']['ci95'][1]:.4f}]</span>"))
  return rows


def write_report(out_dir: str, result: dict, *, gen_extra: dict | None, vae_examples: dict,
                 curves: list[tuple[str, str]], learning_curve: tuple[dict, str | None] | None = None) -> str:
  sections = []
  gen = result.get("generation")
  if gen:
    chance = ", ".join(f"{k} {100 * v:.1f}%" for k, v in gen["chance"].items() if math.isfinite(v))
    sections.append(("Generation: detector scores", report.metric_table(gen["groups"], detector.METRICS) +
                     "<p class=note>95% Wilson intervals; one trial per clip (a two-object clip counts "
                     "only if both objects are right). Chance (a prompt-blind random reader): "
                     f"{chance}. {gen['skipped']} prompts skipped (size off the model's grid).</p>"))
    sections.append(("Detector on the ground-truth renders of the same prompts (ceiling)",
                     report.metric_table(gen["ground_truth"], detector.METRICS)))
    if gen.get("motion_read"):
      sections.append(("Generation: the motion read against the motion prompted", motion_read_table(
          gen["motion_read"])))
  tables = continuous_tables(result)
  if tables:
    sections.append(("Continuous measures", tables))
  vae_read = (result.get("vae_shapes") or {}).get("detector")
  if vae_read:
    sections.append(("Detector on the VAE's reconstructions of the first prompts' renders (the ceiling "
                     "through this VAE)", report.metric_table(vae_read, detector.METRICS)))
  if gen_extra:
    sections.append(("Samples: first, middle and last frames (generated | ground truth)",
                     report.img(gen_extra["grid"], "samples", scale=False)))
  for name, (label, png) in vae_examples.items():
    sections.append((f"VAE reconstructions, {label} (input | reconstruction)",
                     report.img(png, name, scale=False)))
  for run, png in curves:
    sections.append((f"Training curves: {run}", report.img(png, run)))
  if learning_curve:
    sections.append(("Learning curve", learning_curve_html(*learning_curve)))
  used = result.get("sampling") or {}  # what generation ran with, where the settings say 0 = the config's
  settings_rows = [(k, str(used.get(k, v))) for k, v in result["settings"].items()]
  settings_rows += [(k, str(v)) for k, v in used.items() if k not in result["settings"]]
  src = result.get("bundle_source", {})
  settings_rows += [("bundle", result["bundle"]), ("bundle dtype", result.get("bundle_dtype", "")),
                    ("trained steps", f"DiT {src.get('dit_step')}, VAE {src.get('vae_step')}")]
  sections.append(("Settings", report.kv_table(settings_rows)))
  return report.write_html(os.path.join(out_dir, "report.html"), title="sora-jax evaluation",
                           headline=_headline_rows(result), sections=sections)


def _verdict(sc: detector.ClipScore) -> str:
  marks = [f"{m} {'ok' if v else 'WRONG'}" for m in detector.METRICS if (v := getattr(sc, m)) is not None]
  return ", ".join(marks)


# ----------------------------------------------------------------------------------------------- main
def compare_videos(a: Sequence[np.ndarray | None], b: Sequence[np.ndarray | None],
                   specs: Sequence[shapes.ClipSpec]) -> dict:
  """Pixel differences between two bundles' videos of the same prompts and seed, and whether the detector
  reaches the same verdicts on them."""
  diffs, same = [], []
  for x, y, s in zip(a, b, specs):
    if x is None or y is None:
      continue
    diffs.append(np.abs(x.astype(np.int16) - y.astype(np.int16)).ravel())
    vx, vy = detector.score_clip(x, s.labels()), detector.score_clip(y, s.labels())
    same.append(all(getattr(vx, m) == getattr(vy, m) for m in detector.METRICS))
  d = np.concatenate(diffs) if diffs else np.zeros(0)
  return {"videos": len(diffs), "mean_abs_diff": float(d.mean()) if d.size else float("nan"),
          "p99_abs_diff": float(np.percentile(d, 99)) if d.size else float("nan"),
          "max_abs_diff": int(d.max()) if d.size else 0, "same_verdicts": int(sum(same))}


def sampling_used(bundle, s: dict) -> dict:
  """The steps, guidance and sampler that generation runs with (the settings' 0 means the bundle config's
  `sample` section): metrics.json's "sampling", and what the report's settings table shows."""
  try:
    pipe = sampling.as_pipeline(bundle)
  except TypeError:  # a stand-in model with its own `generate`
    return {}
  return {"steps": int(pipe.sample_setting("steps", s["steps"] or None, 30)),
          "guidance": float(pipe.sample_setting("guidance", s["guidance"] or None, 1.0)),
          "sampler": str(pipe.sample_setting("sampler", None,
                                             sampling.Schedule.from_config(pipe.cfg).samplers()[0]))}


def _learning_curve(path: str | None, out_dir: str) -> tuple[dict, str | None] | None:
  """(learning_curve.json's contents, its plot's name in out_dir) from `path`, else from out_dir; the
  plot is copied next to the report when it lies elsewhere, so the report still opens offline."""
  import shutil  # pylint: disable=g-import-not-at-top
  path = path or os.path.join(out_dir, "learning_curve.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    curve = json.load(f)
  png = os.path.join(os.path.dirname(path), "learning_curve.png")
  if not os.path.isfile(png):
    return curve, None
  if os.path.abspath(os.path.dirname(png)) != os.path.abspath(out_dir):
    shutil.copyfile(png, os.path.join(out_dir, "learning_curve.png"))
  return curve, "learning_curve.png"


def evaluate(bundle, out_dir: str, *, workdir: str | None = None, generate: Callable | None = None,
             compare=None, compare_prompts: int = 8, learning_curve: str | None = None, **overrides) -> dict:
  """Runs the whole evaluation of a loaded bundle; writes metrics.json, report.html and PNGs.

  `compare`: another loaded bundle of the same run (a bfloat16 export, say); its videos of the first
  `compare_prompts` prompts are compared with this bundle's (same seed), see `compare_videos`.
  `learning_curve`: a learning_curve.json (sora_jax/bench/learning_curve.py) whose plot and table the
  report shows; by default out_dir/learning_curve.json when there is one.
  """
  if distributed.is_main():
    os.makedirs(out_dir, exist_ok=True)
  s = settings(bundle.config, **overrides)
  result: dict[str, Any] = {"bundle": bundle.path, "settings": s, "sampling": sampling_used(bundle, s),
                            "bundle_source": bundle.manifest.get("source", {}),
                            "bundle_dtype": bundle.manifest.get("dtype", "")}
  vae_examples = {}
  encoded = None  # the first prompts' latents, which vae_scores makes and the object-token error reuses
  if bundle.vae is not None:
    pipe = sampling.as_pipeline(bundle)
    specs = test_prompts(s["vae_clips"], seed=s["seed"], mixture=s["mixture"])
    sets = [("vae_shapes", "held-out Shapes clips", [(shapes.caption(x), shapes.render_clip(x)) for x in specs],
             specs)]
    if s["data_dir"]:
      sets.append(("vae_ingested", f"{s['data_dir']}:{s['data_split']}",
                   ingested_clips(s["data_dir"], s["data_split"], s["vae_clips"]), None))
    for key, label, clips, clip_specs in sets:
      t0 = time.time()
      v = vae_scores(pipe, clips, seed=s["seed"], specs=clip_specs)
      encoded = v.pop("latents", None) or encoded
      rows = [(name, [x, y]) for name, x, y in v.pop("examples")]
      png = distributed.write_on_main(
          lambda: report.grid_png(os.path.join(out_dir, f"{key}_reconstructions.png"), rows))
      vae_examples[key] = (label, os.path.basename(png))
      result[key] = {"label": label, **v}
      print(f"[eval] VAE on {label}: PSNR {v['psnr']['mean']:.2f} dB, SSIM {v['ssim']['mean']:.4f} "
            f"({len(clips)} clips, {time.time() - t0:.0f}s)", flush=True)
  else:
    result["vae_shapes"] = None
    print("[eval] the bundle has no VAE (DiT trained on pooled pixels): no VAE metrics", flush=True)

  t0 = time.time()
  result["object_token_error"] = object_token_error(
      sampling.as_pipeline(bundle), test_prompts(s["denoise_clips"], seed=s["seed"], mixture=s["mixture"]),
      seed=s["seed"], latents=encoded)
  print(f"[eval] {_denoise_line(result['object_token_error'])} ({time.time() - t0:.0f}s)", flush=True)

  t0 = time.time()
  pipe = sampling.as_pipeline(bundle)
  try:
    straight = straight_specs(s["mixture"], s["denoise_clips"], pipe.geometry.temporal)
  except ValueError:  # a mixture without straight-motion clips (images only): no direction to read
    straight = []
  result["caption_reading"] = (caption_reading(pipe, straight, kinds=("direction", "colour"), seed=s["seed"])
                               if straight else None)
  if straight:
    print(f"[eval] {_reading_line(result['caption_reading'])} ({time.time() - t0:.0f}s)", flush=True)

  gen_extra = None
  specs = test_prompts(s["num_prompts"], seed=s["seed"], mixture=s["mixture"])
  videos = generate_videos(bundle, specs, seed=s["seed"], steps=s["steps"], guidance=s["guidance"],
                           chunk=s["chunk"], generate=generate)
  vae_blobs = (result.get("vae_shapes") or {}).pop("blobs_per_frame", None)
  result["blobs_per_frame"] = {"prompts": "one object and no cut (images count as one frame)",
                               "generated": None, "ground_truth": None, "vae_reconstruction": vae_blobs}
  gen = generation_scores(specs, videos, seed=s["seed"])
  scores, kept = gen.pop("_scores"), gen.pop("_kept")
  result["blobs_per_frame"].update(gen.pop("blobs_per_frame"))
  result["generation"] = gen
  rows = [(f"{shapes.caption(sp)} [{sp.num_frames}x{sp.height}x{sp.width}] -- {_verdict(sc)}",
           [v, shapes.render_clip(sp)]) for (sp, v), sc in list(zip(kept, scores))[:24]]
  if rows:
    grid = distributed.write_on_main(lambda: report.grid_png(os.path.join(out_dir, "samples_grid.png"), rows))
    gen_extra = {"grid": os.path.basename(grid)}
  if compare is not None and kept:
    n = min(compare_prompts, len(specs))
    other = generate_videos(compare, specs[:n], seed=s["seed"], steps=s["steps"], guidance=s["guidance"],
                            chunk=s["chunk"], generate=generate)
    result["comparison"] = {"bundle": compare.path, "dtype": compare.manifest.get("dtype", ""),
                            **compare_videos(videos[:n], other, specs[:n])}
  workdir = workdir or result["bundle_source"].get("workdir")

  def write():
    curves = _curves(workdir, out_dir)
    atomic.write_json(os.path.join(out_dir, "metrics.json"), result)
    return write_report(out_dir, result, gen_extra=gen_extra, vae_examples=vae_examples, curves=curves,
                        learning_curve=_learning_curve(learning_curve, out_dir))
  result["report"] = distributed.write_on_main(write)
  return result


def _rates(g: dict) -> str:
  """'colour 98.4% [91.7, 99.7] (n=64); motion ...' for one group's {metric: Rate.to_dict()}."""
  return "; ".join(f"{m} {detector.Rate(g[m]['k'], g[m]['n'])}" for m in detector.METRICS
                   if m in g and g[m]["n"])


def headline(result: dict) -> str:
  """The lines `python -m sora_jax.evaluate` ends with."""
  lines = []
  gen = result.get("generation")
  if gen and "all" in gen["groups"]:
    for group in ("all", "held-out compositions", f"long clips (>= {LONG_CLIP} frames)",
                  "straight motions"):
      g = gen["groups"].get(group)
      if g:
        lines.append(f"[eval] {group}: " + _rates(g))
  for key in ("vae_shapes", "vae_ingested"):
    v = result.get(key)
    if v:
      lines.append(f"[eval] VAE ({v['label']}): PSNR {v['psnr']['mean']:.2f} dB "
                   f"[{v['psnr']['ci95'][0]:.2f}, {v['psnr']['ci95'][1]:.2f}], SSIM {v['ssim']['mean']:.4f}")
      g = (v.get("detector") or {}).get("all")
      if g:
        lines.append("[eval] detector on the VAE's reconstructions: " + _rates(g))
  if result.get("blobs_per_frame"):
    lines.append("[eval] " + _blobs_line(result["blobs_per_frame"]))
  if result.get("object_token_error"):
    lines.append("[eval] " + _denoise_line(result["object_token_error"]))
  if result.get("caption_reading"):
    lines.append("[eval] " + _reading_line(result["caption_reading"]))
  c = result.get("comparison")
  if c:
    lines.append(f"[eval] vs {c['bundle']} ({c['dtype']}): mean |pixel difference| {c['mean_abs_diff']:.3f} "
                 f"(p99 {c['p99_abs_diff']:.0f}, max {c['max_abs_diff']}) of 255 over {c['videos']} videos; "
                 f"same detector verdicts on {c['same_verdicts']}/{c['videos']}")
  lines.append(f"[eval] report: {os.path.abspath(result['report'])}")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
  if not FLAGS.bundle or not FLAGS.out_dir:
    config_lib._fail("--bundle and --out_dir are required")  # pylint: disable=protected-access
  distributed.initialize()  # joins the process group on multi-host launches; no-op on one host
  try:
    loaded = bundle_lib.load(FLAGS.bundle)
  except (bundle_lib.BundleError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  overrides = dict(num_prompts=FLAGS.num_prompts, vae_clips=FLAGS.vae_clips, seed=FLAGS.seed,
                   steps=FLAGS.steps, guidance=FLAGS.guidance, mixture=FLAGS.mixture,
                   data_dir=FLAGS.data_dir, data_split=FLAGS.data_split, denoise_clips=FLAGS.denoise_clips)
  start = time.time()
  compare = None
  if FLAGS.compare_bundle:
    try:
      compare = bundle_lib.load(FLAGS.compare_bundle)
    except (bundle_lib.BundleError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  result = evaluate(loaded, FLAGS.out_dir, workdir=FLAGS.workdir, compare=compare,
                    compare_prompts=FLAGS.compare_prompts, learning_curve=FLAGS.learning_curve, **overrides)
  print(f"[eval] done in {time.time() - start:.0f}s", flush=True)
  print(headline(result), flush=True)


if __name__ == "__main__":
  define_flags()
  config_lib.run(main)
