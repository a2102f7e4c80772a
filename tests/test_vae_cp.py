"""Context-parallel VAE (issue 11): frames spread over a `context` axis of fake CPU devices, each
causal layer's past passed from the neighbour, equal to the single-device chunked VAE."""
from flax import nnx
import jax
import numpy as np
import pytest

from sora_jax import sharding
from sora_jax.models import vae as vae_lib
from sora_jax.models import vae_cp

# 4x temporal, 4x spatial: two 3D downsamplings at toy widths (the causal pasts at every level).
TINY = dict(base_dim=4, dim_mult=(1, 1, 1), num_res_blocks=1, z_dim=4, temporal_downsample=(True, True))


@pytest.fixture(scope="module")
def tiny():
  graphdef, state = nnx.split(vae_lib.VAE(TINY, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  # Perturb the zero-initialised layers so every path (attention projections, biases) carries signal.
  state = jax.tree.map(lambda l: l + 0.05 * rng.standard_normal(l.shape, np.float32), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "context": 4})


def test_encode_equals_chunked(tiny, mesh):
  # 1 + 4 devices x 8 frames: each device holds 2 latent frames, the fewest the causal pasts allow.
  x = jax.random.uniform(jax.random.key(1), (1, 33, 8, 8, 3), minval=-1.0, maxval=1.0)
  mean, logvar = jax.block_until_ready(vae_cp.encode(tiny, x, mesh))
  want_mean, want_logvar = tiny.encode_chunked(x)
  assert mean.shape == want_mean.shape == (1, 9, 2, 2, 4)
  np.testing.assert_allclose(mean, want_mean, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logvar, want_logvar, atol=1e-5, rtol=1e-5)


def test_decode_equals_chunked(tiny, mesh):
  z = jax.random.normal(jax.random.key(2), (1, 9, 2, 2, 4))
  x = jax.block_until_ready(vae_cp.decode(tiny, z, mesh))
  want = tiny.decode_chunked(z)
  assert x.shape == want.shape == (1, 33, 8, 8, 3)
  np.testing.assert_allclose(x, want, atol=1e-5, rtol=1e-5)


def test_too_short_chunks_rejected(tiny, mesh):
  # 1 latent frame per device: the temporal upsampler's 2-frame past would span two devices.
  with pytest.raises(ValueError, match="frames per device"):
    vae_cp.decode(tiny, np.zeros((1, 5, 2, 2, 4), np.float32), mesh)
  with pytest.raises(ValueError, match="multiple of 16"):
    vae_cp.encode(tiny, np.zeros((1, 13, 8, 8, 3), np.float32), mesh)
