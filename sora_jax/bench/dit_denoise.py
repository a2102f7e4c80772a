"""Where does a trained DiT denoise? Its clean-latent error by diffusion time, on object and background tokens.

    python -m sora_jax.bench.dit_denoise --bundle runs/demo/bundle \\
        --latents_dir runs/demo/data/latents --tokenizer runs/demo/data/tokenizer.model

One packed batch of held-out latents (the validation split) is noised at t = 0.1 ... 0.9 with one draw of
noise, and the bundle's EMA DiT predicts x0 (diffusion.predict_x0; caption given, and caption dropped):
the evaluator's implementation (`evaluate.denoise_errors`), which reports the same error on object tokens
at t = 0.7 and 0.9 for every bundle, on rendered test clips and averaged per clip. The squared
error per token (mean over D, normalised latent units) is split into
- object tokens: `diffusion.object_tokens`, the tokens more than 1 (rms over D) from their clip's mean
  token, which is where Shapes' objects are (351 of the 4072 tokens of the default batch; the tokens that
  `diffusion.object_weight` weighs);
- background tokens: the rest;
and set beside a model that knows nothing but the latents' unit variance: the per-token shrinkage
x0 = x_t (1 - t) / ((1 - t)^2 + t^2) (rectified flow; a x_t / (a^2 + s^2) for x_t = a x0 + s eps). A DiT
that has learnt the background but not the objects beats that baseline by far on background tokens and
hardly at all on object tokens. Errors here are pooled over the batch's tokens (the evaluator's are
averaged per clip). The last line printed is one JSON object.
"""
from __future__ import annotations

import json

from absl import flags
import numpy as np

from sora_jax import bundle as bundle_lib
from sora_jax import config as config_lib
from sora_jax import evaluate

_BUNDLE = flags.DEFINE_string("bundle", None, "inference bundle to measure")
_LATENTS = flags.DEFINE_string("latents_dir", None, "encoded latents (default: the bundle config's)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "sentencepiece model (default: the bundle config's)")
_SPLIT = flags.DEFINE_string("split", "validation", "latent split to draw the batch from")
_SEED = flags.DEFINE_integer("noise_seed", 0, "noise seed")
_ROWS = flags.DEFINE_integer("rows", 4, "packed rows in the batch (data.batch_size)")
_BUDGET = flags.DEFINE_integer("token_budget", 576, "data.token_budget of the batch: compare bundles on "
                               "the same batch whatever they trained with")
TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def measure(dit, cfg, batch: dict, seed: int = 0) -> list[dict]:
  """Per-time errors (see the module docstring) of `dit` on one packed batch: evaluate.denoise_errors
  (the evaluator's object-token error) with the caption and without, pooled over the batch's tokens."""
  x0 = np.asarray(batch["tokens"], np.float32)
  eps = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32)
  s = batch["seg_valid"].shape[1]
  runs = {name: evaluate.denoise_errors(dit, cfg, batch, eps, num_segments=s, times=TIMES, text_drop=drop)
          for name, drop in (("text", 0.0), ("no_text", 1.0))}
  obj = runs["text"]["object"]
  bg = runs["text"]["valid"] & ~obj
  rows = []
  for t in TIMES:
    row = dict(t=t, object_tokens=int(obj.sum()), background_tokens=int(bg.sum()))
    for name, run in runs.items():
      err = run[t]["model"]
      row[f"{name}_object"], row[f"{name}_background"] = float(err[obj].mean()), float(err[bg].mean())
    base = runs["text"][t]["shrinkage"]
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
  rows = measure(parts.dit, cfg, batch, _SEED.value)
  print(f"{'t':>4} {'object: DiT / no text / shrinkage':>36} {'background: DiT / no text / shrinkage':>40}")
  for r in rows:
    print(f"{r['t']:4.1f} {r['text_object']:12.3f} {r['no_text_object']:10.3f} {r['shrinkage_object']:12.3f} "
          f"{r['text_background']:14.3f} {r['no_text_background']:10.3f} {r['shrinkage_background']:14.3f}")
  print(json.dumps(dict(bundle=_BUNDLE.value, rows=rows)))


if __name__ == "__main__":
  config_lib.run(main)
