"""Peak memory of the VAE's chunked encode + decode against video length (docs/benchmarks.md, "VAE").

    python -m sora_jax.bench.vae_memory [--config experiments/shapes_demo.py] [--size 128]
        [--frames 17,65]

Each measurement runs in a fresh process (peak RSS never goes down within one) that builds the VAE
from the config's `vae` section with random weights, then encodes and decodes one clip of each
length, chunked (frame 0, then ft frames at a time) or, for contrast, as one full sequence. Reported:
the process's peak RSS, and the same minus the RSS measured just before the clip was created (the
baseline holds the Python runtime, JAX and the weights). The claim under test: chunked peak memory
grows by less than 20% from 17 to 65 frames.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

from sora_jax.bench import host_memory

_CONFIG = flags.DEFINE_string("config_file", "experiments/shapes_demo.py", "config module with `vae`")
_SIZE = flags.DEFINE_integer("size", 128, "frame height and width")
_FRAMES = flags.DEFINE_list("frames", ["17", "65"], "clip lengths (1 + ft*k)")
_CHILD = flags.DEFINE_string("child", "", "internal: 'chunked:T' or 'full:T' measured in this process")


def _measure(config_file: str, mode: str, frames: int, size: int) -> dict:
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models.vae import VAE  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("bench_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  vae = VAE(cfg.vae, rngs=nnx.Rngs(0))
  base = host_memory.rss_mib()
  x = jax.random.uniform(jax.random.key(0), (1, frames, size, size, 3), minval=-1.0, maxval=1.0)
  t0 = time.time()
  if mode == "chunked":
    mean, _ = vae.encode_chunked(x)
    y = vae.decode_chunked(mean)
  else:
    enc = nnx.jit(lambda m, v: m.encode(v)[0])
    dec = nnx.jit(lambda m, z: m.decode(z))
    y = dec(vae, enc(vae, x))
  jax.block_until_ready(y)
  return {"mode": mode, "frames": frames, "size": size, **host_memory.peak_since(base),
          "seconds": round(time.time() - t0, 1), "latent_shape": list(mean.shape) if mode == "chunked"
          else None}


def main(argv):
  del argv
  if _CHILD.value:
    mode, frames = _CHILD.value.split(":")
    print(json.dumps(_measure(_CONFIG.value, mode, int(frames), _SIZE.value)))
    return
  rows = []
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  for mode in ("chunked", "full"):
    for frames in _FRAMES.value:
      rows.append(host_memory.run_child(
          "sora_jax.bench.vae_memory", [f"--config_file={_CONFIG.value}", f"--size={_SIZE.value}",
                                        f"--child={mode}:{frames}"], env, f"{mode}:{frames}"))
  print("| mode | frames | size | peak RSS MiB | above baseline MiB | seconds |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['mode']} | {r['frames']} | {r['size']}x{r['size']} | {r['peak_rss_mib']} | "
          f"{r['peak_above_baseline_mib']} | {r['seconds']} |")
  for mode in ("chunked", "full"):
    by = {r["frames"]: r for r in rows if r["mode"] == mode}
    lo, hi = by[min(by)], by[max(by)]
    print(f"{mode}: peak RSS {lo['frames']} -> {hi['frames']} frames: "
          f"{100 * (hi['peak_rss_mib'] / lo['peak_rss_mib'] - 1):+.1f}% "
          f"(above baseline {100 * (hi['peak_above_baseline_mib'] / max(lo['peak_above_baseline_mib'], 1e-9) - 1):+.1f}%)")


if __name__ == "__main__":
  app.run(main)
