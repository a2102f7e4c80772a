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
recorded in docs/benchmarks.md ("Wan 2.1 interop"). Everything but the VAE and the latents is the demo's
(experiments/shapes_demo.py); sections and keys: experiments/common.py.
"""
from experiments import common
from sora_jax.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  c = common.ConfigDict()
  c.seed = 0
  c.data = common.data(
      latents_dir="runs/wan21/data/latents", tokenizer="runs/demo/data/tokenizer.model",
      mixture="demo",                # evaluate.py's Shapes prompts
      vocab_size=128, seq_len=1024, text_len=384, max_text_tokens=32, max_segments=48, batch_size=2,
      token_budget=576, min_patch_side=2)
  c.mesh = common.mesh()
  c.sample = common.demo_sample()
  c.dit = common.demo_dit(c.data)
  c.diffusion = common.diffusion()
  c.train = common.demo_trainer()
  # diffusers' AutoencoderKLWan defaults: decodes at the encoder's widths, 4x in time (T = 1 + 4k frames
  # -> 1 + k), three 2x spatial downsamplings (8x).
  c.vae = common.wan21_vae(in_channels=3)
  c.eval = common.evaluation()

  if arg.runlocal:
    common.runlocal(c)
  return c
