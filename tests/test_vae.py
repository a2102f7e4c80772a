"""The VAE's contracts: causal in time, chunked == full sequence, images are one-frame videos, Wan layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import vae as vae_lib

# 8x spatial (one 2D and two 3D downsamplings, like Wan 2.1) at toy widths.
TINY = dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, z_dim=4,
            temporal_downsample=(False, True, True))


def _randomised(cfg, seed=0):
  """A VAE whose zero-initialised layers are perturbed, so every path carries signal."""
  graphdef, state = nnx.split(vae_lib.VAE(cfg, rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda l: l + 0.05 * rng.standard_normal(l.shape, np.float32), state)
  return nnx.merge(graphdef, state)


_encode = nnx.jit(lambda m, x: m.encode(x))
_decode = nnx.jit(lambda m, z: m.decode(z))


@pytest.fixture(scope="module")
def tiny():
  return _randomised(TINY)


def _video(shape, seed=2):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def test_encoder_is_causal_in_time(tiny):
  x = _video((1, 9, 16, 24, 3))
  mean, _ = _encode(tiny, x)
  assert mean.shape == (1, 3, 2, 3, 4)
  # Latent frame j covers frames <= 4j: changing frames 5.. leaves latents 0 and 1 untouched.
  mean2, _ = _encode(tiny, x.at[:, 5:].set(0.5))
  np.testing.assert_array_equal(mean2[:, :2], mean[:, :2])
  assert float(jnp.abs(mean2[:, 2] - mean[:, 2]).max()) > 1e-3
  # And frame 4 belongs to latent 1: changing it moves latent 1 but not latent 0.
  mean3, _ = _encode(tiny, x.at[:, 4].set(0.5))
  np.testing.assert_array_equal(mean3[:, :1], mean[:, :1])
  assert float(jnp.abs(mean3[:, 1] - mean[:, 1]).max()) > 1e-3


def test_decoder_is_causal_in_time(tiny):
  z = _video((1, 3, 2, 3, 4)) * 2
  y = _decode(tiny, z)
  assert y.shape == (1, 9, 16, 24, 3)
  y2 = _decode(tiny, z.at[:, 2].set(0.0))
  np.testing.assert_array_equal(y2[:, :5], y[:, :5])  # latent 2 decodes to frames 5..8 only
  assert float(jnp.abs(y2[:, 5:] - y[:, 5:]).max()) > 1e-3


def test_image_is_a_one_frame_video(tiny):
  x = _video((2, 9, 16, 8, 3))
  mean_video, _ = _encode(tiny, x)
  mean_image, logvar_image = _encode(tiny, x[:, :1])
  assert mean_image.shape == (2, 1, 2, 1, 4) and logvar_image.shape == mean_image.shape
  np.testing.assert_allclose(mean_image[:, 0], mean_video[:, 0], atol=1e-5)
  assert _decode(tiny, mean_image).shape == (2, 1, 16, 8, 3)


@pytest.mark.parametrize("cfg,shape", [
    (TINY, (1, 13, 16, 24, 3)),
    pytest.param(dict(TINY, dim_mult=(1, 2, 2), temporal_downsample=(True, True), patch_size=2),
                 (2, 9, 8, 16, 3), marks=pytest.mark.slow),
])
def test_chunked_equals_full_sequence(cfg, shape):
  model = _randomised(cfg, seed=3)
  x = _video(shape)
  mean, logvar = _encode(model, x)
  mean_c, logvar_c = model.encode_chunked(x)
  np.testing.assert_allclose(mean_c, mean, atol=1e-5, rtol=0)
  np.testing.assert_allclose(logvar_c, logvar, atol=1e-5, rtol=0)
  y = _decode(model, mean)
  y_c = model.decode_chunked(mean)
  assert y.shape == x.shape
  np.testing.assert_allclose(y_c, y, atol=1e-5, rtol=0)


def test_tiled_blending_is_exact_for_a_local_map():
  # Blend weights must sum to one everywhere: a pointwise map tiled equals the map on the whole frame.
  x = _video((1, 5, 48, 80, 3))
  fn = lambda t: (t[:, :, ::8, ::8] * 2.0 + 1.0,)
  (tiled,) = vae_lib._tiled(fn, x, 8, 1 / 8, 24 * 24, 0.25, n_out=1)
  np.testing.assert_allclose(tiled, fn(x)[0], atol=1e-6)
  fn_up = lambda t: (jnp.repeat(jnp.repeat(t, 4, axis=2), 4, axis=3) - 0.5,)
  (tiled_up,) = vae_lib._tiled(fn_up, x[:, :, :8, :12], 1, 4.0, 16, 0.5, n_out=1)
  np.testing.assert_allclose(tiled_up, fn_up(x[:, :, :8, :12])[0], atol=1e-6)


def test_tiled_encode_and_decode_shapes(tiny):
  x = _video((1, 5, 32, 48, 3))
  mean, logvar = tiny.encode_chunked(x, max_tile_pixels=16 * 24)
  assert mean.shape == logvar.shape == (1, 2, 4, 6, 4)
  y = tiny.decode_chunked(mean, max_tile_pixels=16 * 24)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("shape,match", [
    ((1, 6, 16, 16, 3), "6 frames"),
    ((1, 0, 16, 16, 3), "0 frames"),
    ((1, 5, 12, 16, 3), "12x16"),
    ((1, 5, 16, 16), "expected"),
])
def test_off_grid_inputs_raise_one_line(tiny, shape, match):
  with pytest.raises(ValueError, match=match):
    _encode(tiny, jnp.zeros(shape))


def test_wan21_config_mirrors_autoencoder_kl_wan_layout():
  wan = dict(base_dim=96, dim_mult=(1, 2, 4, 4), num_res_blocks=2, z_dim=16,
             temporal_downsample=(False, True, True))
  model = nnx.eval_shape(lambda: vae_lib.VAE(wan, rngs=nnx.Rngs(0)))
  s = model.settings
  assert (s.temporal_factor, s.spatial_factor) == (4, 8)
  flat = {".".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # A few of diffusers' names, torch shapes [out, in, kt, kh, kw] seen as [kt, kh, kw, in, out].
  assert flat["encoder.conv_in.kernel"] == (3, 3, 3, 3, 96)
  assert flat["encoder.down_blocks.2.resample.kernel"] == (3, 3, 96, 96)   # downsample2d
  assert "encoder.down_blocks.2.time_conv.kernel" not in flat
  assert flat["encoder.down_blocks.5.time_conv.kernel"] == (3, 1, 1, 192, 192)  # downsample3d
  assert flat["encoder.down_blocks.3.conv_shortcut.kernel"] == (1, 1, 1, 96, 192)
  assert flat["encoder.mid_block.attentions.0.to_qkv.kernel"] == (1, 1, 384, 1152)
  assert flat["encoder.conv_out.kernel"] == (3, 3, 3, 384, 32)
  assert flat["quant_conv.kernel"] == (1, 1, 1, 32, 32)
  assert flat["decoder.up_blocks.0.upsamplers.0.time_conv.kernel"] == (3, 1, 1, 384, 768)
  assert flat["decoder.up_blocks.1.resnets.0.conv1.kernel"] == (3, 3, 3, 192, 384)
  assert flat["decoder.up_blocks.2.upsamplers.0.resample.kernel"] == (3, 3, 192, 96)
  assert "decoder.up_blocks.3.resnets.0.conv_shortcut.kernel" not in flat  # 96 -> 96
  assert flat["decoder.norm_out.gamma"] == (96,)
  n_params = sum(int(np.prod(v)) for v in flat.values())
  assert 126_000_000 < n_params < 128_000_000, n_params  # Wan 2.1's VAE has about 127M


def test_kl_and_posterior_sampling(tiny):
  x = _video((2, 5, 16, 16, 3))
  call = nnx.jit(lambda m, x, key: m(x, key=key))
  recon, mean, logvar = call(tiny, x, jax.random.key(0))
  recon_det, _, _ = nnx.jit(lambda m, x: m(x))(tiny, x)
  assert recon.shape == x.shape
  assert float(jnp.abs(recon - recon_det).max()) > 0  # the sample differs from the mean's decode
  kl = vae_lib.kl_divergence(mean, logvar)
  assert kl.shape == (2,) and bool(jnp.all(kl >= 0))
  np.testing.assert_allclose(vae_lib.kl_divergence(jnp.zeros_like(mean), jnp.zeros_like(logvar)), 0.0)


def test_patch_discriminator_gives_patch_logits():
  disc = vae_lib.PatchDiscriminator3D(8, 2, rngs=nnx.Rngs(0))
  logits = disc(_video((2, 5, 16, 16, 3)))
  assert logits.shape == (2, 3, 4, 4)
  assert float(vae_lib.hinge_d_loss(jnp.full(3, 2.0), jnp.full(3, -2.0))) == 0.0


@pytest.mark.parametrize("kernel,t_stride", [((3, 3, 3), 1), ((3, 1, 1), 2), ((3, 1, 1), 1),
                                             ((1, 1, 1), 1)])
def test_cpu_conv3d_as_2d_convs_equals_the_native_3d_conv(kernel, t_stride):
  # On CPU the VAE computes its 3D convs as one 2D conv per temporal tap (4x faster on XLA:CPU);
  # TPU/GPU use the native conv. The two must be the same function.
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 12, 5))
  k = jax.random.normal(jax.random.key(1), (*kernel, 5, 7))
  kh, kw = kernel[1:]
  native = jax.lax.conv_general_dilated(
      x, k, (t_stride, 1, 1), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=vae_lib.CONV_DIMS, precision="highest")
  with jax.default_matmul_precision("highest"):
    ours = vae_lib._conv3d_as_2d(x, k, t_stride)
  assert ours.shape == native.shape
  np.testing.assert_allclose(ours, native, atol=1e-4, rtol=1e-5)
