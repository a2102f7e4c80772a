"""Sampling speed: packed inference against one-by-one, and a one-minute video on this CPU.

    python -m sora_jax.bench.sampling --what=packed      # 8 small prompts: one packed row vs 8 calls
    python -m sora_jax.bench.sampling --what=minute      # 481 frames at 32x32, text to pixels

Both use the demo's model sizes (experiments/shapes_demo.py) with random weights (speed does not depend
on the weights), or a trained bundle with --bundle. `packed` times the denoising loop only (decoding is per
video either way), as the minimum over --repeats runs after a warm-up run that compiles every shape;
compile time is reported apart. `minute` times one generate() call end to end (compiles included, as a
user would see it) and then again warm.
"""
from __future__ import annotations

import json
import time

from absl import app, flags
import jax
import numpy as np

from sora_jax import sampling

_WHAT = flags.DEFINE_list("what", ["packed", "minute"], "sections: packed, minute")
_BUNDLE = flags.DEFINE_string("bundle", None, "a trained bundle instead of random demo-sized models")
_STEPS = flags.DEFINE_integer("steps", 10, "sampler steps")
_GUIDANCE = flags.DEFINE_float("guidance", 4.0, "classifier-free guidance (2 model rows per row)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs (the minimum is reported)")

# Small prompts of mixed sizes, as an evaluation batch of images and short clips would be.
PROMPTS = [("a red circle on a black background", 1, 32, 32),
           ("a blue square moving left on a gray background", 9, 32, 32),
           ("a green triangle still on a black background", 17, 32, 32),
           ("a white circle moving up on a black background", 9, 32, 48),
           ("a yellow square on a gray background", 1, 48, 32),
           ("a red triangle bouncing left and right on a black background", 17, 32, 64),
           ("a blue circle moving down on a gray background", 9, 64, 32),
           ("a green square on a black background", 1, 64, 64)]


def demo_pipeline() -> sampling.Pipeline:
  """Random-weight models of the demo's sizes, with a character tokenizer (speed needs no training)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from sora_jax import patching  # pylint: disable=g-import-not-at-top
  from sora_jax.models.dit import DiT  # pylint: disable=g-import-not-at-top
  from sora_jax.models.vae import VAE  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "shapes_demo.py")
  spec = importlib.util.spec_from_file_location("shapes_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  vae = VAE(cfg.vae, rngs=nnx.Rngs(1))
  cfg.dit.in_dim = patching.token_dim(vae.settings.z_dim, tuple(cfg.data.patch))
  dit = DiT(cfg.dit, rngs=nnx.Rngs(0))
  vocab = int(cfg.dit.vocab_size)
  tokenize = lambda s: [1 + ord(ch) % (vocab - 1) for ch in s]
  c = vae.settings.z_dim
  return sampling.Pipeline(cfg, dit, vae, tokenize, np.zeros(c, np.float32), np.ones(c, np.float32))


def load() -> sampling.Pipeline:
  if _BUNDLE.value:
    from sora_jax import bundle  # pylint: disable=g-import-not-at-top
    return sampling.as_pipeline(bundle.load(_BUNDLE.value))
  return demo_pipeline()


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def bench_packed(pipe: sampling.Pipeline) -> dict:
  kw = dict(seed=0, steps=_STEPS.value, guidance=_GUIDANCE.value)
  reqs = [sampling.Request(*p) for p in PROMPTS]
  packed = lambda: sampling.sample_latents(pipe, reqs, **kw)
  alone = lambda: [sampling.sample_latents(pipe, [r], index_offset=i, **kw) for i, r in enumerate(reqs)]
  compile_packed, compile_alone = _timed(packed), _timed(alone)
  t_packed = min(_timed(packed) for _ in range(_REPEATS.value))
  t_alone = min(_timed(alone) for _ in range(_REPEATS.value))
  a, b = packed(), [z for zs in alone() for z in zs]
  diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
  g = pipe.geometry
  tokens = [g.num_tokens(n, h, w) for _, n, h, w in PROMPTS]
  return dict(section="packed", prompts=len(PROMPTS), tokens=tokens, steps=_STEPS.value,
              guidance=_GUIDANCE.value, packed_s=round(t_packed, 3), one_by_one_s=round(t_alone, 3),
              speedup=round(t_alone / t_packed, 2), first_run_packed_s=round(compile_packed, 1),
              first_run_one_by_one_s=round(compile_alone, 1), max_abs_latent_diff=diff)


def bench_minute(pipe: sampling.Pipeline) -> dict:
  req = [("a red circle bouncing left and right on a black background", 481, 32, 32)]
  kw = dict(seed=0, steps=_STEPS.value, guidance=_GUIDANCE.value)
  start = time.perf_counter()
  (video,) = sampling.generate(pipe, req, **kw)
  cold = time.perf_counter() - start
  start = time.perf_counter()
  latents = sampling.sample_latents(pipe, req, **kw)
  denoise = time.perf_counter() - start
  start = time.perf_counter()
  pipe.decode(latents[0])
  decode = time.perf_counter() - start
  return dict(section="minute", frames=int(video.shape[0]), size=list(video.shape[1:3]),
              dtype=str(video.dtype), tokens=pipe.geometry.num_tokens(481, 32, 32), steps=_STEPS.value,
              guidance=_GUIDANCE.value, first_run_s=round(cold, 1), warm_denoise_s=round(denoise, 1),
              warm_decode_s=round(decode, 1))


def main(argv):
  del argv
  pipe = load()
  for what in _WHAT.value:
    fn = {"packed": bench_packed, "minute": bench_minute}.get(what)
    if fn is None:
      raise app.UsageError(f"--what {what!r} is unknown; accepted: packed, minute")
    print(json.dumps(fn(pipe)), flush=True)


if __name__ == "__main__":
  app.run(main)
