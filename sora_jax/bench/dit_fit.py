"""Can the DiT fit one packed batch? A check for a model whose samples stay poor however long it trains.

    python -m sora_jax.bench.dit_fit --config experiments/shapes_demo.py --bundle runs/demo/bundle \\
        --workdir /tmp/fit --config.data.latents_dir=runs/demo/data/latents \\
        --config.data.tokenizer=runs/demo/data/tokenizer.model --config.train.total_steps=300 [--config.dit.*]

1. train.train on the first packed batch of the configured latents, the same batch every step (a model
   that can learn anything memorises it; its loss curve is in W/metrics.jsonl);
2. the trained EMA DiT samples that batch's clips (those neither downscaled nor cropped by the pipeline)
   from their own captions and sizes, decoded by the bundle's VAE; each is scored against itself (PSNR)
   and against its caption (sora_jax.detector);
3. mixing: N(0, 1) is added to the first half of the row's largest segment at t = 0.3 / 0.6 / 0.9, and
   the rms change of the perturbed half's and of the other half's predictions is reported (a model whose
   tokens ignore each other changes only the first).

The bundle supplies the VAE, tokenizer and latent statistics of the latents; the DiT comes from the
config. The last line printed is one JSON object.
"""
from __future__ import annotations

import json

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import bundle as bundle_lib
from sora_jax import config as config_lib
from sora_jax import detector, metrics, patching, sampling, train

_WORKDIR = config_lib.flag(flags.DEFINE_string, "workdir", None, "where the trainer writes")
_BUNDLE = flags.DEFINE_string("bundle", None, "inference bundle: VAE, tokenizer and latent stats")
_CLIPS = flags.DEFINE_integer("clips", 12, "clips of the batch to sample and score")
_SEED = flags.DEFINE_integer("seed", 0, "sampling and perturbation seed")


class _Repeat:
  """One batch forever, checkpointable like a grain iterator."""

  def __init__(self, batch):
    self.batch = batch

  def __iter__(self):
    return self

  def __next__(self):
    return self.batch

  def get_state(self):
    return {}

  def set_state(self, state):
    del state


def own_clips(pipe: sampling.Pipeline, batch: dict, max_clips: int, seed: int) -> list[dict]:
  """Samples the batch's unresized clips from their captions and scores them against themselves."""
  patch = tuple(int(p) for p in pipe.cfg.dit.patch)
  out = []
  for r in range(batch["tokens"].shape[0]):
    latents = patching.unpack_row(batch["tokens"][r], batch["segment_ids"][r], batch["seg_grid"][r], patch)
    for k, z in enumerate(latents):
      resized = batch["seg_scale"][r, k] != 1 or batch["seg_cropped"][r, k]
      if len(out) == max_clips or resized:
        continue
      ids = batch["text_tokens"][r][batch["text_segment_ids"][r] == k + 1]
      caption = pipe.tokenize.decode(int(i) for i in ids)
      truth = pipe.decode(z)
      (video,) = sampling.generate(pipe, [(caption, *truth.shape[:3])], seed=seed)
      score = detector.score_clip(video, caption)
      out.append(dict(caption=caption, frames=int(truth.shape[0]), psnr=metrics.psnr(video, truth),
                      colour=score.colour, motion=score.motion))
  return out


def mixing(dit, batch: dict, seed: int) -> list[dict]:
  """rms change of a segment's perturbed half and of its other half, per diffusion time."""
  row = {k: jnp.asarray(batch[k][:1]) for k in ("tokens", "positions", "segment_ids", "text_tokens",
                                                 "text_segment_ids")}
  seg = np.asarray(batch["segment_ids"][0])
  ids, counts = np.unique(seg[seg > 0], return_counts=True)
  idx = np.where(seg == ids[np.argmax(counts)])[0]
  first, rest = idx[:len(idx) // 2], idx[len(idx) // 2:]
  s = batch["seg_valid"].shape[1]
  rng = np.random.default_rng(seed)
  eps = rng.standard_normal(row["tokens"].shape).astype(np.float32)
  bump = rng.standard_normal((len(first), eps.shape[-1])).astype(np.float32)
  out = []
  for t in (0.3, 0.6, 0.9):
    f = lambda x: dit(x, row["positions"], row["segment_ids"], jnp.full((1, s), t, jnp.float32),
                      row["text_tokens"], row["text_segment_ids"], text_drop=jnp.zeros((1, s)))
    x_t = (1 - t) * row["tokens"] + t * eps
    a, b = f(x_t), f(x_t.at[0, first].add(bump))
    change = lambda sel: float(jnp.sqrt(jnp.mean(jnp.square(b[0, sel] - a[0, sel]))))
    out.append(dict(t=t, tokens=int(len(idx)), perturbed=change(first), others=change(rest),
                    prediction_rms=float(jnp.sqrt(jnp.mean(jnp.square(a[0, idx]))))))
  return out


def main(argv):
  del argv
  if not _WORKDIR.value or not _BUNDLE.value:
    config_lib._fail("--workdir and --bundle are required")  # pylint: disable=protected-access
  cfg = train.prepare_config(config_lib.get_config(), _WORKDIR.value)
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batch = {k: np.asarray(v) for k, v in next(iter(pipeline.make_iterator(cfg, split="train"))).items()}
  state = train.train(cfg, _WORKDIR.value, data=(_Repeat(batch), pipeline.to_global))
  dit = bundle_lib.build_model(lambda: train.make_model(cfg, nnx.Rngs(0)), jax.device_get(state["ema"]),
                               what="DiT")
  parts = bundle_lib.load(_BUNDLE.value)
  pipe = sampling.Pipeline(cfg, dit, parts.vae, parts.tokenizer, np.asarray(parts.latent_shift, np.float32),
                           np.asarray(parts.latent_scale, np.float32))
  clips = own_clips(pipe, batch, _CLIPS.value, _SEED.value)
  for c in clips:
    print(f"{c['caption'][:70]:70s} {c['frames']:3d} frames  PSNR {c['psnr']:.1f} dB  colour {c['colour']}  "
          f"motion {c['motion']}")
  mix = mixing(dit, batch, _SEED.value)
  for m in mix:
    print(f"t={m['t']}: perturbing half of a {m['tokens']}-token segment changes its predictions by rms "
          f"{m['perturbed']:.3f}, the other half's by {m['others']:.3f} "
          f"(predictions rms {m['prediction_rms']:.3f})")
  judged = lambda key: [c[key] for c in clips if c[key] is not None]
  print(json.dumps(dict(steps=int(jax.device_get(state["step"])), clips=len(clips),
                        mean_psnr=float(np.mean([c["psnr"] for c in clips])) if clips else None,
                        colour=f"{sum(judged('colour'))}/{len(judged('colour'))}",
                        motion=f"{sum(judged('motion'))}/{len(judged('motion'))}", mixing=mix)))


if __name__ == "__main__":
  config_lib.run(main)
