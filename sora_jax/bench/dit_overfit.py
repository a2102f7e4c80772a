"""Can the DiT learn a few clips by heart? A check of the training recipe on a problem it must solve.

    python -m sora_jax.bench.dit_overfit --config experiments/shapes_demo.py --workdir W \\
        --vae runs/demo/vae --clips 8 --config.data.latents_dir=runs/demo/data/latents \\
        --config.data.tokenizer=runs/demo/data/tokenizer.model --config.train.total_steps=1500

1. The first `clips` training records that are short one-object videos with motion (no cut) become the
   whole training set: the ordinary pipeline packs them (repeated epochs, fresh noise and timesteps
   every step) and train.train trains on them for train.total_steps.
2. The EMA DiT then samples each clip from its own caption, size and a fixed seed; the video is scored
   against the clip itself (PSNR of the decoded latents against the decoded truth) and against its
   caption (detector colour and motion, blobs per frame). A DiT that can learn should reproduce clips it
   saw hundreds of times: layout and motion come from the caption, since only its noise differs.
3. The clean-latent error on the clips' object tokens at t = 0.3, 0.5, 0.7, 0.9 (x0 from the DiT's
   velocity, mean squared error in normalised latent units; `diffusion.object_tokens`), over 4 noises.

The VAE comes from a trainer's run directory (`--vae`), the tokenizer and latent statistics from the
config's data paths. The last line printed is one JSON object.
"""
from __future__ import annotations

import json

from absl import flags
from flax import nnx
import jax
import numpy as np

from sora_jax import bundle as bundle_lib
from sora_jax import config as config_lib
from sora_jax import detector, evaluate, metrics, patching, sampling, train
from sora_jax.data import shapes

_WORKDIR = config_lib.flag(flags.DEFINE_string, "workdir", None, "where the trainer writes")
_VAE = flags.DEFINE_string("vae", None, "the VAE trainer's run directory (its newest EMA weights)")
_CLIPS = flags.DEFINE_integer("clips", 8, "training clips to learn")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


class Subset:
  """The records `indices` of `source`, as a random-access source."""

  def __init__(self, source, indices):
    self.source, self.indices = source, list(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[self.indices[i]]


def pick_clips(source, count: int) -> list[int]:
  """Indices of the first `count` records that are one-object videos with motion and no cut."""
  out = []
  for i in range(len(source)):
    spec = shapes.ClipSpec.from_json(source[i]["labels"])
    if spec.num_frames > 1 and len(spec.objects) == 1 and not spec.cut_frame and (
        spec.objects[0].motion != "still") and spec.num_frames <= 33:
      out.append(i)
      if len(out) == count:
        return out
  raise ValueError(f"only {len(out)} training records are one-object moving clips; asked for {count}")


def object_errors(dit, cfg, tokens_list, texts, seed: int, ts=(0.3, 0.5, 0.7, 0.9), noises: int = 4) -> dict:
  """{t: mean squared x0 error on object tokens}, each clip alone in its row, `noises` noises each
  (evaluate.denoise_errors, the evaluator's measure)."""
  rng = np.random.default_rng(seed)
  sums = {t: [] for t in ts}
  for (tok, pos), ids in zip(tokens_list, texts):
    batch = dict(tokens=tok[None], positions=pos[None], segment_ids=np.ones((1, len(tok)), np.int32),
                 text_tokens=np.asarray(ids)[None], text_segment_ids=np.ones((1, len(ids)), np.int32))
    for _ in range(noises):
      out = evaluate.denoise_errors(dit, cfg, batch, rng.standard_normal(batch["tokens"].shape),
                                    num_segments=1, times=ts)
      if out["object"].any():
        for t in ts:
          sums[t].append(float(out[t]["model"][out["object"]].mean()))
  return {t: float(np.mean(v)) for t, v in sums.items()}


def main(argv):
  del argv
  if not _WORKDIR.value or not _VAE.value:
    config_lib._fail("--workdir and --vae are required")  # pylint: disable=protected-access
  cfg = train.prepare_config(config_lib.get_config(), _WORKDIR.value)
  from sora_jax.data import pipeline, tokenizer  # pylint: disable=g-import-not-at-top
  from sora_jax.models.vae import VAE  # pylint: disable=g-import-not-at-top
  source = pipeline.open_source(cfg, "train")
  picked = pick_clips(source, _CLIPS.value)
  subset = Subset(source, picked)
  data = pipeline.make_iterator(cfg, split="train", source=subset)
  state = train.train(cfg, _WORKDIR.value, data=(data, pipeline.to_global))
  dit = bundle_lib.build_model(lambda: train.make_model(cfg, nnx.Rngs(0)), jax.device_get(state["ema"]),
                               what="DiT")
  vae_params, _, _ = bundle_lib.restore_ema(bundle_lib.Path(_VAE.value))
  vae = bundle_lib.build_model(lambda: VAE(cfg.vae, rngs=nnx.Rngs(0)), vae_params, what="VAE")
  tok = tokenizer.Tokenizer(cfg.data.tokenizer)
  shift, scale = pipeline.latent_stats(cfg)
  pipe = sampling.Pipeline(cfg, dit, vae, tok, shift, scale)
  patch = tuple(int(p) for p in cfg.dit.patch)

  clips, tokens_list, texts = [], [], []
  for i in picked:
    rec = source[i]
    z = (np.asarray(rec["latent_mean"], np.float32) - shift) / scale
    truth = pipe.decode(z)
    (video,) = sampling.generate(pipe, [(rec["caption"], *truth.shape[:3])], seed=_SEED.value)
    score = detector.score_clip(video, rec["caption"])
    clips.append(dict(caption=rec["caption"], frames=int(truth.shape[0]), size=list(truth.shape[1:3]),
                      psnr=metrics.psnr(video, truth), colour=score.colour,
                      motion=score.motion, blobs=evaluate.blobs_per_frame(video),
                      truth_blobs=evaluate.blobs_per_frame(truth)))
    tokens_list.append(patching.patchify(z, patch))
    texts.append(pipe.text_ids(rec["caption"]))
  errors = object_errors(dit, cfg, tokens_list, texts, _SEED.value)
  for c in clips:
    print(f"{c['caption'][:64]:64s} {c['frames']:3d}f {c['size']}  PSNR {c['psnr']:5.1f}  colour {c['colour']}"
          f"  motion {c['motion']}  blobs {c['blobs']:.2f} (truth {c['truth_blobs']:.2f})")
  judged = lambda key: [c[key] for c in clips if c[key] is not None]
  print(json.dumps(dict(steps=int(jax.device_get(state["step"])), clips=len(clips),
                        mean_psnr=float(np.mean([c["psnr"] for c in clips])),
                        colour=f"{sum(judged('colour'))}/{len(judged('colour'))}",
                        motion=f"{sum(judged('motion'))}/{len(judged('motion'))}",
                        blobs=float(np.mean([c["blobs"] for c in clips])),
                        object_error={str(k): round(v, 4) for k, v in errors.items()})))


if __name__ == "__main__":
  config_lib.run(main)
