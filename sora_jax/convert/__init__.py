"""Converters from published checkpoints into sora_jax's checkpoint format.

`python -m sora_jax.convert.wan_vae` turns a diffusers `AutoencoderKLWan` (the Wan 2.1 video VAE)
safetensors file into a VAE run directory that loads like one the VAE trainer wrote.
"""
