"""The caption encoder: a small transformer over sentencepiece ids, trained jointly with the DiT.

Captions are packed like the videos (`text_tokens [B, Lt]`, `text_segment_ids [B, Lt]`, 0 = padding),
so self-attention is restricted to each caption's own segment and positions (1-D RoPE) restart at every
caption: a caption encodes to the same features whatever else is packed in its row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import sharding
from sora_jax.models import layers

MLP_RATIO = 4  # the caption encoder's MLP width, in multiples of text_width


class TextBlock(nnx.Module):
  """Pre-norm transformer block: segment-restricted self-attention with 1-D RoPE, then an MLP."""

  def __init__(self, dim: int, heads: int, *, implementation: str, context: str = "none", dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layers.RMSNorm(dim, **kw)
    self.attn = layers.Attention(dim, heads, implementation=implementation, context=context, **kw)
    self.norm2 = layers.RMSNorm(dim, **kw)
    self.mlp = layers.MLP(dim, MLP_RATIO * dim, **kw)

  def __call__(self, x, segment_ids, angles):
    h = self.norm1(x)
    x = x + self.attn(h, segment_ids, h, segment_ids, q_angles=angles, kv_angles=angles)
    x = x + self.mlp(self.norm2(x))
    return sharding.constrain(x, ("act_batch", "act_seq", "act_embed"))


class TextEncoder(nnx.Module):
  """text_tokens [B, Lt] int32, text_segment_ids [B, Lt] -> features [B, Lt, text_width] (compute dtype).

  Config keys read from cfg.dit: vocab_size, text_width, text_depth, text_heads, rope_theta,
  attention, context, remat, dtype, param_dtype.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    with nnx.use_eager_sharding(False):  # annotated, but constructible outside a mesh (as the DiT)
      self.embed = layers.param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.text_width),
                                ("vocab", "embed"), param_dtype)
      self.blocks = layers.stack_layers(
          lambda r: TextBlock(cfg.text_width, cfg.text_heads, implementation=cfg.attention,
                              context=cfg.context, dtype=dtype, param_dtype=param_dtype, rngs=r),
          cfg.text_depth, rngs)
      self.norm = layers.RMSNorm(cfg.text_width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head_dim = cfg.text_width // cfg.text_heads
    self.rope_theta, self.remat, self.dtype, self.vocab_size = cfg.rope_theta, cfg.remat, dtype, cfg.vocab_size

  def __call__(self, text_tokens: jax.Array, text_segment_ids: jax.Array) -> jax.Array:
    tokens = jnp.clip(text_tokens, 0, self.vocab_size - 1)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    x = sharding.constrain(x, ("act_batch", "act_seq", "act_embed"))
    pos = layers.positions_in_segment(text_segment_ids)[..., None]
    angles = layers.rope_angles(pos, (self.head_dim,), self.rope_theta)
    x = layers.scan_layers(self.blocks, x, lambda blk, x: blk(x, text_segment_ids, angles), self.remat)
    return self.norm(x)
