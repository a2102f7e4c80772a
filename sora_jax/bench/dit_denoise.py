"""Where does a trained DiT denoise? Its clean-latent error by diffusion time, on object and background tokens.

    python -m sora_jax.bench.dit_denoise --bundle runs/demo/bundle \\
        --latents_dir runs/demo/data/latents --tokenizer runs/demo/data/tokenizer.model

One packed batch of held-out latents (the validation split) is noised at t = 0.1 ... 0.9 with one draw of
noise, and the bundle's EMA DiT predicts x0 = x_t - t v (caption given, and caption dropped). The squared
error per token (mean over D, normalised latent units) is split into
- object tokens: `diffusion.object_tokens`, the tokens more than 1 (rms over D) from their clip's mean
  token, which is where Shapes' objects are (351 of the 4072 tokens of the default batch; the tokens that
  `diffusion.object_weight` weighs);
- background tokens: the rest;
and set beside a model that knows nothing but the latents' unit variance: the per-token shrinkage
x0 = x_t (1 - t) / ((1 - t)^2 + t^2). A DiT that has learnt the background but not the objects beats
that baseline by far on background tokens and hardly at all on object tokens. The last line printed is
one JSON object.
"""
from __future__ import annotations

import json

from absl import flags
import jax.numpy as jnp
import numpy as np

from sora_jax import bundle as bundle_lib
from sora_jax import config as config_lib
from sora_jax import diffusion

_BUNDLE = flags.DEFINE_string("bundle", None, "inference bundle to measure")
_LATENTS = flags.DEFINE_string("latents_dir", None, "encoded latents (default: the bundle config's)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "sentencepiece model (default: the bundle config's)")
_SPLIT = flags.DEFINE_string("split", "validation", "latent split to draw the batch from")
_SEED = flags.DEFINE_integer("noise_seed", 0, "noise seed")
_ROWS = flags.DEFINE_integer("rows", 4, "packed rows in the batch (data.batch_size)")
_BUDGET = flags.DEFINE_integer("token_budget", 576, "data.token_budget of the batch: compare bundles on "
                               "the same batch whatever they trained with")
TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def measure(dit, batch: dict, seed: int = 0) -> list[dict]:
  """Per-time errors (see the module docstring) of `dit` on one packed batch."""
  x0 = np.asarray(batch["tokens"], np.float32)
  seg = np.asarray(batch["segment_ids"])
  valid = seg > 0
  b, s = x0.shape[0], batch["seg_valid"].shape[1]
  obj = np.asarray(diffusion.object_tokens(jnp.asarray(x0), jnp.asarray(seg), s)) > 0
  bg = valid & ~obj
  eps = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32)
  args = [jnp.asarray(batch[k]) for k in ("positions", "segment_ids")]
  text = [jnp.asarray(batch[k]) for k in ("text_tokens", "text_segment_ids")]
  rows = []
  for t in TIMES:
    x_t = (1 - t) * x0 + t * eps
    row = dict(t=t, object_tokens=int(obj.sum()), background_tokens=int(bg.sum()))
    for name, drop in (("text", 0.0), ("no_text", 1.0)):
      v = dit(jnp.asarray(x_t), *args, jnp.full((b, s), t, jnp.float32), *text,
              text_drop=jnp.full((b, s), drop, jnp.float32))
      err = np.mean((x_t - t * np.asarray(v, np.float32) - x0) ** 2, axis=-1)
      row[f"{name}_object"], row[f"{name}_background"] = float(err[obj].mean()), float(err[bg].mean())
    base = np.mean((x_t * (1 - t) / ((1 - t) ** 2 + t ** 2) - x0) ** 2, axis=-1)
    row["shrinkage_object"], row["shrinkage_background"] = float(base[obj].mean()), float(base[bg].mean())
    rows.append(row)
  return rows


def main(argv):
  del argv
  if not _BUNDLE.value:
    config_lib._fail("--bundle is required")  # pylint: disable=protected-access
  parts = bundle_lib.load(_BUNDLE.value)
  cfg = parts.config
  if _LATENTS.value:
    cfg.data.latents_dir = _LATENTS.value
  if _TOKENIZER.value:
    cfg.data.tokenizer = _TOKENIZER.value
  cfg.data.batch_size, cfg.data.token_budget = _ROWS.value, _BUDGET.value
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batch = {k: np.asarray(v) for k, v in next(iter(pipeline.make_iterator(cfg, split=_SPLIT.value))).items()}
  rows = measure(parts.dit, batch, _SEED.value)
  print(f"{'t':>4} {'object: DiT / no text / shrinkage':>36} {'background: DiT / no text / shrinkage':>40}")
  for r in rows:
    print(f"{r['t']:4.1f} {r['text_object']:12.3f} {r['no_text_object']:10.3f} {r['shrinkage_object']:12.3f} "
          f"{r['text_background']:14.3f} {r['no_text_background']:10.3f} {r['shrinkage_background']:14.3f}")
  print(json.dumps(dict(bundle=_BUNDLE.value, rows=rows)))


if __name__ == "__main__":
  config_lib.run(main)
