"""sora-jax: text-to-video diffusion over spacetime patches, in JAX/Flax NNX."""
# First, before any module imports jax: which backends JAX starts (libtpu only where a TPU is attached).
from sora_jax import platforms as _platforms

_platforms.apply()
