"""The Diffusion Transformer: denoises packed spacetime-patch tokens, one diffusion time per segment.

    model = DiT(cfg.dit, rngs=nnx.Rngs(0))
    v_bld = model(x_bld, positions_bl3, segment_ids_bl, t_bs, text_tokens_bm, text_segment_ids_bm,
                  cond=cond_bld, cond_mask=cond_mask_bl, text_drop=text_drop_bs)

Every packed row holds many videos/images (segments 1..S, 0 = padding). Nothing crosses a segment
boundary: self-attention is restricted by `segment_ids`, positions are per-sample 3-D RoPE, the
adaLN-Zero modulation is computed per segment from that segment's time `t[:, k-1]` and gathered per
token, and text enters by cross-attention to the caption of the token's own segment. So each segment's
output is the same as when it is run alone (tests/test_dit.py checks it).

Design choices:
- Text by segment-restricted cross-attention, not MMDiT joint attention: the packed text row stays
  separate from the video row (no interleaving of captions into segments, so packing and the
  block-sparse self-attention kernels see only video tokens), video self-attention cost does not grow
  with caption length, and the caption is encoded once per row rather than carried through every block.
- Classifier-free guidance: every segment always sees one extra key, a learned null-text embedding
  (the kv row is the captions followed by S null tokens with segment ids 1..S). `text_drop[:, k-1] = 1`
  masks that segment's caption out, leaving only the null token, so the unconditional prediction does not
  depend on the dropped caption's length, and a segment with an empty caption is still well defined.
- Conditioning (image/video prompts): tokens with `cond_mask = 1` are given. Their input is replaced by
  the clean `cond` latents, they are modulated with the t = 0 embedding instead of their segment's t
  (they are noise-free), and `[cond * mask, mask]` enters through a zero-initialised, bias-free input
  projection (so an untrained path is exactly "no conditioning", and `cond=None` equals an all-zero mask).
  Their outputs are meaningless; diffusion.loss_fn excludes them and samplers keep them fixed.
- Single-device construction: parameters carry logical axis names but are created with
  `nnx.use_eager_sharding(False)`, so the constructor works with or without a mesh. Training shards them
  explicitly: `nnx.get_partition_spec(nnx.state(model))` -> `sharding.logical_to_spec` -> device_put/jit
  out_shardings.

Config keys (cfg.dit): in_dim (token dim D = pt*ph*pw*latent channels), vocab_size (sentencepiece
vocabulary), width, depth, num_heads, mlp_ratio, time_freq_dim, rope_theta, qk_norm, text_width,
text_depth, text_heads, attention (segment_attention implementation), remat (a name in layers.REMAT_POLICIES:
"none" | "full" | "dots" | "dots_saveable" | "full_save_attention" | "full_save_self_attention"), dtype
(compute), param_dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import sharding
from sora_jax.models import layers
from sora_jax.models.text import TextEncoder

ACT = ("act_batch", "act_seq", "act_embed")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features [..., dim] of t in [0, 1] (scaled by 1000 so the low frequencies matter)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _modulate(x, shift, scale):
  return x * (1 + scale) + shift


def row_one_hot(seg_bl, given_bl, num_segments: int, dtype) -> jax.Array:
  """[B, L, S + 1] one-hot of the per-segment row each token reads in `per_token_rows`: row seg - 1
  (padding, id 0, reads row 0), or row S (the t = 0 row) where `given` is set. Built once per forward."""
  idx = jnp.where(given_bl, num_segments, jnp.clip(seg_bl - 1, 0, num_segments - 1))
  return (idx[..., None] == jnp.arange(num_segments + 1, dtype=idx.dtype)).astype(dtype)


def per_token_rows(table_bs, given_row, onehot_bls):
  """Per-segment rows [B, S, ...] (plus `given_row` [...] as row S) -> per-token [B, L, ...] by `row_one_hot`.

  diffusion.per_token does the same for [B, S] scalars with a gather; here a one-hot matmul instead: on
  TPU a gather over [B, L, 6, W] and its backward (a scatter-add) and the `where` for given tokens each
  stream the whole tensor through HBM, about 5 GB per layer at sora-B's 32k tokens per chip (docs/pods.md);
  the matmul and its transpose run on the MXU. Exact: one non-zero term per output (HIGHEST precision
  keeps f32 tables exact on TPU).
  """
  b = table_bs.shape[0]
  full = jnp.concatenate([table_bs, jnp.broadcast_to(given_row.astype(table_bs.dtype),
                                                     (b, 1) + table_bs.shape[2:])], axis=1)
  return jnp.einsum("bls,bs...->bl...", onehot_bls.astype(table_bs.dtype), full,
                    precision=jax.lax.Precision.HIGHEST)


class DiTBlock(nnx.Module):
  """adaLN-Zero block: modulated self-attention (3-D RoPE, QK-norm), cross-attention to the segment's
  caption, modulated MLP; the adaLN projection is zero-initialised so each block starts as identity."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    w = cfg.width
    self.norm1 = layers.RMSNorm(w, use_scale=False, **kw)
    self.attn = layers.Attention(w, cfg.num_heads, qk_norm=cfg.qk_norm, implementation=cfg.attention, **kw)
    self.norm_x = layers.RMSNorm(w, **kw)
    self.cross = layers.Attention(w, cfg.num_heads, qk_norm=cfg.qk_norm, implementation=cfg.attention,
                                  cross=True, **kw)
    self.norm2 = layers.RMSNorm(w, use_scale=False, **kw)
    self.mlp = layers.MLP(w, int(w * cfg.mlp_ratio), **kw)
    self.ada = layers.Dense(w, (6, w), ("embed", None, None), zero_init=True, **kw)

  def __call__(self, x, ctx):
    seg, angles, c_bsw, c0_w, rows, kv, kv_seg = ctx
    # Modulation per segment ([B, S, 6, W], cheap), then looked up per token: one lookup per modulation,
    # not one of [B, L, 6, W], so each [B, L, W] result fuses into its consumer and the backward needs no
    # [B, L, 6, W] gradient buffer.
    mod_bs, mod0 = self.ada(jax.nn.silu(c_bsw)), self.ada(jax.nn.silu(c0_w))
    shift1, scale1, gate1, shift2, scale2, gate2 = (per_token_rows(mod_bs[:, :, i], mod0[i], rows)
                                                    for i in range(6))

    h = _modulate(self.norm1(x), shift1, scale1)
    x = x + gate1 * self.attn(h, seg, h, seg, q_angles=angles, kv_angles=angles)
    x = x + self.cross(self.norm_x(x), seg, kv, kv_seg)
    x = x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))
    return sharding.constrain(x, ACT)


class DiT(nnx.Module):
  """Text-conditioned DiT over packed tokens; see the module docstring for the call contract."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if cfg.in_dim < 1:
      raise ValueError(f"dit.in_dim={cfg.in_dim}: set it to the data's token dim pt*ph*pw*latent channels")
    if cfg.width % cfg.num_heads:
      raise ValueError(f"dit.width={cfg.width} is not divisible by dit.num_heads={cfg.num_heads}")
    head_dim = cfg.width // cfg.num_heads
    self.rope_dims = layers.rope_split(head_dim, 3)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    w = cfg.width
    with nnx.use_eager_sharding(False):
      self.x_embed = layers.Dense(cfg.in_dim, w, (None, "embed"), **kw, rngs=rngs)
      self.cond_embed = layers.Dense(cfg.in_dim + 1, w, (None, "embed"), use_bias=False, zero_init=True,
                                     **kw, rngs=rngs)
      self.t_embed1 = layers.Dense(cfg.time_freq_dim, w, (None, "embed"), **kw, rngs=rngs)
      self.t_embed2 = layers.Dense(w, w, ("embed", None), **kw, rngs=rngs)
      self.text = TextEncoder(cfg, rngs=rngs)
      self.text_proj = layers.Dense(cfg.text_width, w, (None, "embed"), **kw, rngs=rngs)
      self.null_text = layers.param(rngs, nnx.initializers.normal(0.02), (w,), ("embed",), param_dtype)
      self.blocks = layers.stack_layers(lambda r: DiTBlock(cfg, **kw, rngs=r), cfg.depth, rngs)
      self.final_norm = layers.RMSNorm(w, use_scale=False, **kw, rngs=rngs)
      self.final_ada = layers.Dense(w, (2, w), ("embed", None, None), zero_init=True, **kw, rngs=rngs)
      self.out = layers.Dense(w, cfg.in_dim, ("embed", None), zero_init=True, **kw, rngs=rngs)
    self.time_freq_dim, self.rope_theta, self.remat, self.dtype = (
        cfg.time_freq_dim, cfg.rope_theta, cfg.remat, dtype)

  def _time(self, t):
    h = self.t_embed1(timestep_embedding(t, self.time_freq_dim))
    return self.t_embed2(jax.nn.silu(h))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, t: jax.Array,
               text_tokens: jax.Array, text_segment_ids: jax.Array, *, cond: jax.Array | None = None,
               cond_mask: jax.Array | None = None, text_drop: jax.Array | None = None) -> jax.Array:
    """x [B,L,D], positions int [B,L,3], segment_ids int [B,L], t [B,S], text [B,Lt] -> [B,L,D] float32."""
    b, _, _ = x.shape
    s = t.shape[1]
    seg = segment_ids.astype(jnp.int32)
    if (cond is None) != (cond_mask is None):
      raise ValueError("cond and cond_mask must be given together (or neither); got only "
                       f"{'cond' if cond is not None else 'cond_mask'}")
    given = jnp.zeros(seg.shape, bool) if cond_mask is None else cond_mask > 0

    # Inputs: given tokens are the clean conditioning latents, plus the zero-initialised cond path.
    if cond is not None:
      x = jnp.where(given[..., None], cond, x)
    h = self.x_embed(x)
    if cond is not None:
      gm = given[..., None].astype(x.dtype)
      h = h + self.cond_embed(jnp.concatenate([cond * gm, gm], axis=-1))
    h = sharding.constrain(h, ACT)

    # Time: one embedding per segment; the t = 0 one for given tokens.
    c_bsw = self._time(t)
    c0_w = self._time(jnp.zeros((), jnp.float32))

    # Text: captions followed by one learned null token per segment (ids 1..S); text_drop hides captions.
    tseg = text_segment_ids.astype(jnp.int32)
    if text_drop is not None:
      drop_tok = jnp.take_along_axis(text_drop, jnp.clip(tseg - 1, 0, s - 1), axis=1) > 0
      tseg = jnp.where(drop_tok, 0, tseg)
    text_bmw = self.text_proj(self.text(text_tokens, text_segment_ids))
    null = jnp.broadcast_to(self.null_text[...].astype(self.dtype), (b, s, text_bmw.shape[-1]))
    kv = jnp.concatenate([text_bmw, null], axis=1)
    kv_seg = jnp.concatenate([tseg, jnp.broadcast_to(jnp.arange(1, s + 1, dtype=jnp.int32), (b, s))], axis=1)
    # Sort keys by segment (each null token next to its caption, hidden/padding keys last): attention is
    # invariant to key order, and the block-sparse kernels cost what the segments cost only when ids are
    # contiguous and increasing.
    perm = jnp.argsort(jnp.where(kv_seg > 0, kv_seg, s + 1), axis=1, stable=True)
    kv = jnp.take_along_axis(kv, perm[..., None], axis=1)
    kv_seg = jnp.take_along_axis(kv_seg, perm, axis=1)

    angles = layers.rope_angles(positions, self.rope_dims, self.rope_theta)
    rows = row_one_hot(seg, given, s, self.dtype)
    ctx = (seg, angles, c_bsw, c0_w, rows, kv, kv_seg)
    h = layers.scan_layers(self.blocks, h, lambda blk, h: blk(h, ctx), self.remat)

    fmod_bs, fmod0 = self.final_ada(jax.nn.silu(c_bsw)), self.final_ada(jax.nn.silu(c0_w))
    shift, scale = (per_token_rows(fmod_bs[:, :, i], fmod0[i], rows) for i in range(2))
    out = self.out(_modulate(self.final_norm(h), shift, scale)).astype(jnp.float32)
    return jnp.where((seg > 0)[..., None], out, 0.0)
