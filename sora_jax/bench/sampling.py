"""Sampling speed: packed inference against one-by-one, and a one-minute video on this CPU.

    python -m sora_jax.bench.sampling --what=packed      # 8 and 32 small prompts: packed rows vs 1 by 1
    python -m sora_jax.bench.sampling --what=minute      # 481 frames at 32x32, text to pixels

Both use the demo's model sizes (experiments/shapes_demo.py) with random weights (speed does not depend
on the weights), or a trained bundle with --bundle. `packed` times the denoising loop only (decoding is per
video either way), as the minimum over --repeats runs after a warm-up run that compiles every shape;
compile time is reported apart. `minute` times one generate() call end to end (compiles included, as a
user would see it) and then again warm.
"""
from __future__ import annotations

import json
import math
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
_NUM_PROMPTS = flags.DEFINE_list("num_prompts", ["8", "32"], "packed: prompt counts (PROMPTS, cycled)")
_ROW_LENS = flags.DEFINE_list("row_lens", ["128", "256", "1024"], "packed: row lengths to compare")
_ATTENTION = flags.DEFINE_string("attention", None, "override dit.attention (random-weight models only)")

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
  from sora_jax.models import dit as dit_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.models.dit import DiT  # pylint: disable=g-import-not-at-top
  from sora_jax.models.vae import VAE  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "shapes_demo.py")
  spec = importlib.util.spec_from_file_location("shapes_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  # The demo's VAE section when it exists; else a VAE of the same 4x8x8 grid at docs/hazards.md's calibration
  # width (base 32, 16 latent channels).
  vae_cfg = cfg.vae if "vae" in cfg else dict(base_dim=32, dim_mult=(1, 2, 4, 4), num_res_blocks=1, z_dim=16,
                                         temporal_downsample=(False, True, True))
  vae = VAE(vae_cfg, rngs=nnx.Rngs(1))
  cfg.dit.in_dim = dit_lib.resolve_in_dim(cfg.dit, lambda: vae.settings.z_dim)
  if _ATTENTION.value:
    cfg.dit.attention = _ATTENTION.value
  dit = DiT(cfg.dit, rngs=nnx.Rngs(0))
  # Zero-initialised output layers predict exactly 0; perturb every weight so outputs (and the packed vs
  # one-by-one difference) are those of a generic model.
  state = nnx.state(dit, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  nnx.update(dit, jax.tree.unflatten(
      treedef, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
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


def _cpu_timed(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process: all its threads), for a machine shared with others."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - wall, time.process_time() - cpu


def bench_packed(pipe: sampling.Pipeline, num_prompts: int) -> dict:
  """Denoising time of `num_prompts` small prompts: packed into rows of each --row_lens, or one by one."""
  kw = dict(seed=0, steps=_STEPS.value, guidance=_GUIDANCE.value)
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_prompts)]
  reqs = [sampling.Request(*p) for p in prompts]
  row_lens = [int(r) for r in _ROW_LENS.value]
  packed = {r: (lambda r=r: sampling.sample_latents(pipe, reqs, row_len=r, **kw)) for r in row_lens}
  alone = lambda: [sampling.sample_latents(pipe, [r], index_offset=i, **kw) for i, r in enumerate(reqs)]
  first = {f"packed_{r}": round(_timed(fn), 1) for r, fn in packed.items()}
  first["one_by_one"] = round(_timed(alone), 1)
  times = {k: [] for k in first}
  for _ in range(_REPEATS.value):  # interleaved, so every variant sees the same CPU conditions
    for r, fn in packed.items():
      times[f"packed_{r}"].append(_timed(fn))
    times["one_by_one"].append(_timed(alone))
  best = {k: round(min(v), 3) for k, v in times.items()}
  ref = [z for zs in alone() for z in zs]
  diff = max(float(np.abs(x - y).max()) for r in row_lens for x, y in zip(packed[r](), ref))
  g = pipe.geometry
  grids = [g.grid(n, h, w) for _, n, h, w in prompts]
  rows = {r: 1 + max(p.row for p in sampling.pack(grids, r)[0]) for r in row_lens}
  return dict(section="packed", prompts=len(prompts), tokens=sum(math.prod(x) for x in grids),
              rows=rows, attention=str(pipe.cfg.dit.attention), dtype=str(pipe.cfg.dit.dtype),
              steps=_STEPS.value, guidance=_GUIDANCE.value, seconds=best,
              speedup_vs_one_by_one={k: round(best["one_by_one"] / v, 2) for k, v in best.items()},
              first_run_seconds=first, max_abs_latent_diff=diff)


def bench_minute(pipe: sampling.Pipeline) -> dict:
  req = [("a red circle bouncing left and right on a black background", 481, 32, 32)]
  kw = dict(seed=0, steps=_STEPS.value, guidance=_GUIDANCE.value)
  videos = []
  cold = _cpu_timed(lambda: videos.extend(sampling.generate(pipe, req, **kw)))
  latents = []
  denoise = _cpu_timed(lambda: latents.extend(sampling.sample_latents(pipe, req, **kw)))
  decode = _cpu_timed(lambda: pipe.decode(latents[0]))
  r = lambda x: dict(wall_s=round(x[0], 1), cpu_s=round(x[1], 1))
  return dict(section="minute", frames=int(videos[0].shape[0]), size=list(videos[0].shape[1:3]),
              dtype=str(videos[0].dtype), tokens=pipe.geometry.num_tokens(481, 32, 32),
              attention=str(pipe.cfg.dit.attention), steps=_STEPS.value, guidance=_GUIDANCE.value,
              first_run=r(cold), warm_denoise=r(denoise), warm_decode=r(decode))


def main(argv):
  del argv
  pipe = load()
  for what in _WHAT.value:
    if what == "packed":
      for n in _NUM_PROMPTS.value:
        print(json.dumps(bench_packed(pipe, int(n))), flush=True)
    elif what == "minute":
      print(json.dumps(bench_minute(pipe)), flush=True)
    else:
      raise app.UsageError(f"--what {what!r} is unknown; accepted: packed, minute")


if __name__ == "__main__":
  app.run(main)
