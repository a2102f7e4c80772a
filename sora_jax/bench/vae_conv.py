"""3D convolutions on XLA:CPU: the demo VAE's train step with native 3D convs vs one 2D conv per tap.

    python -m sora_jax.bench.vae_conv --config experiments/shapes_demo.py [--steps 5]

Both forms compute the same sum (tests/test_vae.py); models/vae.py picks the 2D form on CPU. Each form's
step (forward + backward of the reconstruction loss on one batch of the demo's crop shapes: 4 images
32x32 and one 17x32x32 video) is compiled, run once, then timed over `--steps` steps, in one process so
that the ratio is measured under one load.
"""
from __future__ import annotations

import time

from absl import app, flags
import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import config as config_lib
from sora_jax.models import vae as vae_lib

_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per form")


def time_step(cfg, conv, steps: int) -> tuple[float, float]:
  """(compile + first step seconds, mean step seconds) of the VAE's loss gradient with `conv`."""
  original = vae_lib.conv3d
  vae_lib.conv3d = conv
  try:
    graphdef, params = nnx.split(vae_lib.VAE(cfg.vae, rngs=nnx.Rngs(0)))
    images = jax.random.uniform(jax.random.key(0), (4, 1, 32, 32, 3)) * 2 - 1
    videos = jax.random.uniform(jax.random.key(1), (1, 17, 32, 32, 3)) * 2 - 1

    def loss(p):
      model = nnx.merge(graphdef, p)
      return sum(jnp.mean(jnp.square(model(x)[0] - x)) for x in (images, videos))

    grad = jax.jit(jax.grad(loss))
    t0 = time.perf_counter()
    jax.block_until_ready(grad(params))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(grad(params))
    return first, (time.perf_counter() - t0) / steps
  finally:
    vae_lib.conv3d = original


def main(argv):
  del argv
  cfg = config_lib.get_config()
  print(f"backend {jax.default_backend()}, {jax.device_count()} devices")
  results = {}
  forms = (("native 3D conv", vae_lib._conv3d_native), ("2D conv per tap", vae_lib._conv3d_as_2d))  # pylint: disable=protected-access
  for name, conv in forms:
    first, step = time_step(cfg, conv, _STEPS.value)
    results[name] = step
    print(f"{name:>16}: compile + first step {first:.1f} s, step {step * 1e3:.0f} ms")
  print(f"speed-up of the 2D form: {results['native 3D conv'] / results['2D conv per tap']:.2f}x")


if __name__ == "__main__":
  config_lib.run(main)
