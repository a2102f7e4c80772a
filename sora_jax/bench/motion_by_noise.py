"""At which noise level does a bundle lose the motion its prompt asks for?

    python -m sora_jax.bench.motion_by_noise --bundle runs/demo/bundle [--mixture single] [--num_clips 40] \\
        [--sigmas 0,0.1,0.2,0.3,0.5] [--strengths 0.3,0.5,0.7,0.9]

Takes the first `num_clips` test clips of a Shapes mixture whose objects all move (uncut videos) and
scores motion and persistence with the evaluator's detector on two kinds of videos:
- `latent` rows, the decoder's tolerance: the true clip encoded by the bundle's VAE, Gaussian noise of
  std sigma added to its normalised latents, decoded. If motion survives a sigma as large as the DiT's
  own errors, the latent space is not what loses it.
- `sdedit` rows, the DiT's: the true clip's latents noised to t = strength and denoised by the DiT under
  the clip's own caption (sampling.edit_prompt, the bundle's sampler). Motion kept at low strength and
  lost at high strength says which noise levels the DiT has not learned to organise.
The last line printed is one JSON object: {"latent": {sigma: rates}, "sdedit": {strength: rates}}.
"""
from __future__ import annotations

import json

from absl import app, flags
import numpy as np

from sora_jax import bundle as bundle_lib
from sora_jax import detector
from sora_jax import sampling
from sora_jax.data import shapes

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs as a command (tests import this module beside entry
  points that define --bundle themselves)."""
  flags.DEFINE_string("bundle", None, "inference bundle")
  flags.DEFINE_string("mixture", "single", "Shapes mixture whose test split gives the clips")
  flags.DEFINE_integer("num_clips", 40, "clips to score", lower_bound=1)
  flags.DEFINE_list("sigmas", ["0", "0.1", "0.2", "0.3", "0.5"], "latent noise stds (normalised units)")
  flags.DEFINE_list("strengths", ["0.3", "0.5", "0.7", "0.9"], "SDEdit strengths (t of the start)")
  flags.DEFINE_integer("seed", 0, "noise seed")


def moving_specs(mixture: str, n: int) -> list[shapes.ClipSpec]:
  """The first n test clips of `mixture` that are uncut videos whose objects all move."""
  def moving(s):
    return s.num_frames > 1 and not s.cut_frame and all(o.motion != "still" for o in s.objects)
  return shapes.first_specs(mixture, n, moving, "uncut clips with moving objects")


def rates(videos, specs) -> dict:
  """Motion and persistence as 'k/n' strings and rates, the detector's verdicts on each video."""
  scores = [detector.score_clip(v, shapes.caption(s)) for v, s in zip(videos, specs)]
  out = {}
  for key in ("motion", "persistence"):
    judged = [getattr(sc, key) for sc in scores if getattr(sc, key) is not None]
    out[key] = {"k": int(sum(judged)), "n": len(judged), "rate": float(np.mean(judged)) if judged else None}
  return out


def latent_rows(pipe, specs, sigmas, seed: int) -> dict:
  """{sigma: rates} of the true clips round-tripped through pipe.encode / decode with latent noise."""
  rng = np.random.default_rng(seed)
  latents = [pipe.encode(shapes.render_clip(s)) for s in specs]
  rows = {}
  for sigma in sigmas:
    videos = [pipe.decode(z + sigma * rng.standard_normal(z.shape).astype(np.float32)) for z in latents]
    rows[str(sigma)] = rates(videos, specs)
  return rows


def sdedit_rows(bundle, specs, strengths, seed: int, batch: int = 20) -> dict:
  """{strength: rates} of the DiT's SDEdit of each true clip under its own caption."""
  pipe = sampling.as_pipeline(bundle)
  truths = [shapes.render_clip(s) for s in specs]
  rows = {}
  for strength in strengths:
    requests = [sampling.edit_prompt(pipe, shapes.caption(s), v, s.num_frames, s.height, s.width, strength)
                for s, v in zip(specs, truths)]
    videos = []
    for i in range(0, len(requests), batch):
      videos += sampling.generate(bundle, requests[i:i + batch], seed=seed, index_offset=i)
    rows[str(strength)] = rates(videos, specs)
  return rows


def main(argv):
  del argv
  if not FLAGS.bundle:
    raise SystemExit("error: --bundle is required (an exported inference bundle directory)")
  b = bundle_lib.load(FLAGS.bundle)
  specs = moving_specs(FLAGS.mixture, FLAGS.num_clips)
  out = {"bundle": FLAGS.bundle, "mixture": FLAGS.mixture, "clips": len(specs)}
  out["latent"] = latent_rows(sampling.as_pipeline(b), specs, [float(x) for x in FLAGS.sigmas], FLAGS.seed)
  for sigma, r in out["latent"].items():
    print(f"latent noise {sigma}: motion {r['motion']['k']}/{r['motion']['n']}", flush=True)
  out["sdedit"] = sdedit_rows(b, specs, [float(x) for x in FLAGS.strengths], FLAGS.seed)
  for st, r in out["sdedit"].items():
    print(f"sdedit {st}: motion {r['motion']['k']}/{r['motion']['n']}", flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  define_flags()
  app.run(main)
