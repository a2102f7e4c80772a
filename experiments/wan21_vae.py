"""The demo with the Wan 2.1 video VAE in place of a trained one: 4x8x8 compression, 16 latent channels.

sora_jax's VAE in the Wan 2.1 configuration (base width 96, dim_mult [1, 2, 4, 4], 2 residual blocks
per level, temporal downsampling [False, True, True], 127M parameters) loads the published weights
converted from diffusers' `AutoencoderKLWan`:

    python -m sora_jax.convert.wan_vae --input Wan2.1-T2V-1.3B-Diffusers/vae/diffusion_pytorch_model.safetensors \
        --out runs/wan21/vae
    python -m sora_jax.reconstruct --vae runs/wan21/vae --input in.mp4 --out out.mp4
    python data_pipelines/encode_latents.py --vae runs/wan21/vae --data_dir runs/demo/data/shapes \
        --out_dir runs/wan21/data/latents
    python -m sora_jax.train --config experiments/wan21_vae.py --workdir runs/wan21/dit

The converted run also holds Wan's published per-channel latent statistics (latent_stats.json). With the
demo's (1, 2, 2) patches a token is 64-dimensional. Equality with diffusers (max abs error <= 1e-4 in
float32 for images and 17-frame videos, random weights) is tested in tests/test_wan_interop.py and
recorded in docs/benchmarks.md ("Wan 2.1 interop").
"""
import importlib.util
import os

import ml_collections

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_demo.py")


def _demo_config(arg):
  spec = importlib.util.spec_from_file_location("shapes_demo", _DEMO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  c = _demo_config(arg)
  if "vae" not in c:
    c.vae = ml_collections.ConfigDict()
  # Wan 2.1's VAE (diffusers' AutoencoderKLWan defaults); keys the VAE owner adds keep the demo's values.
  c.vae.base_dim = 96
  c.vae.decoder_base_dim = 0      # 0 = base_dim (Wan 2.1 decodes at the encoder's widths)
  c.vae.dim_mult = (1, 2, 4, 4)   # three 2x spatial downsamplings: 8x
  c.vae.num_res_blocks = 2
  c.vae.z_dim = 16
  c.vae.temporal_downsample = (False, True, True)  # 4x in time: T = 1 + 4k frames -> 1 + k
  c.vae.patch_size = 1
  c.vae.in_channels = 3
  c.vae.dtype = "float32"
  c.vae.norm = "rms"              # Wan's per-position RMS norm (the demo VAE trains without one)
  c.data.latents_dir = "runs/wan21/data/latents"
  return c
