"""The Diffusion Transformer: denoises packed spacetime-patch tokens, one diffusion time per segment.

    model = DiT(cfg.dit, rngs=nnx.Rngs(0))
    v_bld = model(x_bld, positions_bl3, segment_ids_bl, t_bs, text, text_segment_ids_bm,
                  cond=cond_bld, cond_mask=cond_mask_bl, text_drop=text_drop_bs)

The block is Wan 2.1's (diffusers `WanTransformer3DModel`; sora_jax/convert/wan.py loads its weights and
tests/test_wan_dit_interop.py checks the outputs): layer norms without affine parameters under the
modulations, self-attention with QK RMS-norm across heads and 3-D RoPE (head_dim split t/h/w as
`layers.rope_split`), cross-attention to the text behind an affine layer norm, a GELU(tanh) MLP; the
modulation is one time projection shared by all blocks plus a learned [6, W] table per block, and the
output layer's [2, W] table is added to the time embedding itself. So the demo DiT, the pod presets and
Wan 2.1 are sizes and settings of one model (docs/architecture.md lists what differs and why).

What packing adds (each segment's output is the same as when it is run alone; tests/test_dit.py):
- Every packed row holds many videos/images (segments 1..S, 0 = padding). Self-attention is restricted by
  `segment_ids`, positions are per-sample 3-D RoPE, the modulation is computed per segment from that
  segment's time `t[:, k-1]` and looked up per token, and text enters by cross-attention to the caption
  of the token's own segment.
- Text by segment-restricted cross-attention, not MMDiT joint attention: the packed text row stays
  separate from the video row, so packing and the block-sparse self-attention kernels see only video
  tokens and video self-attention cost does not grow with caption length.
- `text` is caption ids [B, Lt] for the jointly trained caption encoder (`dit.text_encoder = "caption"`,
  models/text.py, the demo), or precomputed features [B, Lt, text_dim] from a frozen encoder
  (`"umt5"`, models/umt5.py; Wan pads each caption's features to 512 with zeros, and the DiT attends to
  the padding as Wan does: the data and the sampler lay those rows out).
- Classifier-free guidance: `text_drop[:, k-1] = 1` zeroes segment k's text features. Its keys are then
  all the projection of a zero vector, so the unconditional prediction depends neither on the dropped
  caption nor on its length (for Wan, zero features are what its padding already is).
- Conditioning (image/video prompts): tokens with `cond_mask = 1` are given. Their input is replaced by
  the clean `cond` latents, they are modulated with the t = 0 embedding instead of their segment's t
  (they are noise-free), and `[cond * mask, mask]` enters through a zero-initialised, bias-free input
  projection (so an untrained path is exactly "no conditioning", and `cond=None` equals an all-zero mask).
  Their outputs are meaningless; diffusion.loss_fn excludes them and samplers keep them fixed.
- Initialisation from scratch is adaLN-Zero: the time projection, the per-block tables and the output
  layer start at zero, so every block starts as the identity (Wan draws its tables at random).
- Single-device construction: parameters carry logical axis names but are created with
  `nnx.use_eager_sharding(False)`, so the constructor works with or without a mesh. Training shards them
  explicitly: `nnx.get_partition_spec(nnx.state(model))` -> `sharding.logical_to_spec` -> device_put/jit
  out_shardings.

Config keys (cfg.dit): patch (the spacetime patch (pt, ph, pw) a token covers, in latents), in_dim (token
dim D = pt*ph*pw*latent channels; 0 = the data's, `resolve_in_dim`), width, depth, num_heads, ffn_dim,
time_freq_dim, rope_theta, qk_norm, text_encoder ("caption": also vocab_size, text_width, text_depth,
text_heads; "umt5": text_dim, the encoder's width), attention (segment_attention's local kernel), context
(its context parallelism: "none" | "ring" | "ulysses"; absent = "none"), attention_axes (what each
block's self-attention spans, cycled over the blocks: "full" = its segment, Wan's; "space" = one latent
frame; "time" = one place through the frames; absent = ("full",)), mlp_conv (a depthwise 3x3x3 spacetime
convolution, separable, on each MLP's hidden layer over the token's neighbours in its segment, as Sana's
Mix-FFN; starts as the identity; absent = False, Wan's), abs_pos (absolute places beside RoPE: each token's
fractional (t, h, w) in its segment, NaViT's, as sin/cos features through a zero-initialised layer added to
the input embedding, so that a caption can say where in the frame and when in the clip; absent = False,
Wan's), remat (a policy of layers.REMAT,
the table of them), dtype (compute), param_dtype.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import patching, sharding
from sora_jax.models import layers
from sora_jax.models.text import TextEncoder

ACT = ("act_batch", "act_seq", "act_embed")
TEXT_ENCODERS = ("caption", "umt5")


def resolve_in_dim(cfg, latent_channels: Callable[[], int]) -> int:
  """The token dim of the DiT of config section `cfg` (cfg.dit): `in_dim` as configured, or, when 0 (the
  data's), pt*ph*pw*c for `latent_channels()` = c channels in `patch` patches. The one place it is
  derived (the trainer from its data's statistics, export from the bundle's); `latent_channels` is called
  only then, since it may read files."""
  return int(cfg.in_dim or 0) or patching.token_dim(int(latent_channels()), tuple(cfg.patch))


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


ATTENTION_AXES = ("full", "space", "time")


def attention_axis_ids(positions_bl3, segment_ids_bl):
  """Self-attention groups [3, B, L] int32 for `dit.attention_axes` ("full", "space", "time"): a
  segment; a segment's latent frame; a segment's place (h, w) through its frames (factorised space-time
  attention, as in Latte and Open-Sora 1's STDiT). 0 = padding. Every kernel masks by equal ids, so a
  group is a segment to it. numpy in, numpy out (flops.py counts the pairs); jax in, jax out."""
  xp = np if isinstance(segment_ids_bl, np.ndarray) else jnp
  seg = segment_ids_bl.astype(xp.int32)
  t, h, w = (positions_bl3[..., i].astype(xp.int32) for i in range(3))
  width = w.max() + 1
  places = (h.max() + 1) * width
  space = seg * (t.max() + 1) + t + 1
  time = seg * (places + 1) + h * width + w + 1
  return xp.stack([seg] + [xp.where(seg > 0, i, 0) for i in (space, time)])


def segment_extent(positions_bl3, segment_ids_bl):
  """Each token's segment grid (T, H, W) [B, L, 3] int32: one more than the segment's largest position
  along each axis (a padding token gets that of id 0)."""
  seg = segment_ids_bl.astype(jnp.int32)
  pos = positions_bl3.astype(jnp.int32)
  n = seg.shape[1]
  extent = jax.vmap(lambda v, s: jax.ops.segment_max(v, s, num_segments=n + 1))
  return jnp.stack([jnp.take_along_axis(extent(pos[..., c], seg), seg, axis=1) + 1 for c in range(3)], -1)


ABS_POS_FREQS = 4


def fractional_positions(positions_bl3, segment_ids_bl):
  """`dit.abs_pos`'s features [B, L, 6 * ABS_POS_FREQS] float32: cos and sin of pi k u, k = 1..ABS_POS_FREQS,
  for u = (position + 0.5) / extent along t, h and w (NaViT's fractional coordinates: the same place of a
  frame, or moment of a clip, reads the same at every size; an image is the clip's middle)."""
  u = (positions_bl3.astype(jnp.float32) + 0.5) / segment_extent(positions_bl3, segment_ids_bl)
  arg = jnp.pi * u[..., None] * jnp.arange(1, ABS_POS_FREQS + 1, dtype=jnp.float32)  # [B, L, 3, K]
  feats = jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)
  return feats.reshape(feats.shape[:2] + (-1,))


def spacetime_neighbours(positions_bl3, segment_ids_bl):
  """Each token's neighbours one step back and forward along t, h and w in its own segment, for
  `dit.mlp_conv` (layers.NeighbourConv): (index [B, L, 3, 2] int32, valid [B, L, 3, 2] bool).

  A segment's tokens lie in raster order (t, h, w) (patching.patchify), so a neighbour is a fixed stride
  away: 1 along w, the segment's grid width along h, its height x width along t; `valid` also checks the
  neighbour's segment and position, so a grid's edge, another segment or padding is never read."""
  seg = segment_ids_bl.astype(jnp.int32)
  pos = positions_bl3.astype(jnp.int32)
  b, n = seg.shape
  grid = segment_extent(pos, seg)
  height, width = grid[..., 1], grid[..., 2]
  strides = jnp.stack([height * width, width, jnp.ones_like(width)], axis=-1)  # [B, L, 3]
  i = jnp.arange(n, dtype=jnp.int32)[None, :, None, None]
  sign = jnp.array([-1, 1], jnp.int32)
  j = i + strides[..., None] * sign  # [B, L, 3, 2]
  jc = jnp.clip(j, 0, n - 1)
  take = lambda v: jnp.take_along_axis(v, jc.reshape(b, -1), axis=1).reshape(jc.shape)
  step = jnp.eye(3, dtype=jnp.int32)[:, None, :] * sign[:, None]  # [3 axes, 2 signs, 3 coords]
  same_place = jnp.ones(j.shape, bool)
  for c in range(3):
    same_place &= take(pos[..., c]) == pos[..., c, None, None] + step[..., c]
  valid = (j == jc) & (seg[..., None, None] > 0) & (take(seg) == seg[..., None, None]) & same_place
  return jc, valid


class DiTBlock(nnx.Module):
  """Wan 2.1's block: modulated self-attention (3-D RoPE, QK-norm across heads), cross-attention to the
  segment's caption (affine layer norm, no gate), modulated GELU(tanh) MLP.

  The modulation is the shared per-segment time projection `mod_bs` (computed once in the DiT) plus this
  block's learned table `mod` [6, W]: shift, scale, gate for attention, then for the MLP.
  """

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    w = cfg.width
    self.norm1 = layers.LayerNorm(w, affine=False, **kw)
    attend = dict(qk_norm=cfg.qk_norm, implementation=cfg.attention, context=cfg.context)
    self.attn = layers.Attention(w, cfg.num_heads, **attend, **kw)
    self.norm_cross = layers.LayerNorm(w, **kw)
    self.cross = layers.Attention(w, cfg.num_heads, cross=True, **attend, **kw)
    self.norm2 = layers.LayerNorm(w, affine=False, **kw)
    self.mlp = layers.MLP(w, cfg.ffn_dim, conv=cfg.mlp_conv, **kw)
    # Zero, with the zero-initialised time projection: every block starts as the identity (adaLN-Zero).
    self.mod = layers.param(rngs, nnx.initializers.zeros, (6, w), (None, "embed"), param_dtype)

  def __call__(self, x, ctx, axes=None):
    seg, angles, mod_bs, mod0, rows, kv, kv_seg, axis_ids, neighbours = ctx
    self_ids = seg if axes is None else axis_ids[axes]  # dit.attention_axes: this block's groups
    table = self.mod[...]
    # Per-segment rows ([B, S, 6, W], cheap) looked up per token one modulation at a time: each [B, L, W]
    # result fuses into its consumer and the backward needs no [B, L, 6, W] gradient buffer.
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        per_token_rows(mod_bs[:, :, i] + table[i], mod0[i] + table[i], rows) for i in range(6))

    h = _modulate(self.norm1(x), shift1, scale1).astype(x.dtype)
    x = x + (gate1 * self.attn(h, self_ids, h, self_ids, q_angles=angles, kv_angles=angles)).astype(x.dtype)
    x = x + self.cross(self.norm_cross(x), seg, kv, kv_seg)
    h = _modulate(self.norm2(x), shift2, scale2).astype(x.dtype)
    x = x + (gate2 * self.mlp(h, neighbours)).astype(x.dtype)
    return sharding.constrain(x, ACT)


class DiT(nnx.Module):
  """Text-conditioned DiT over packed tokens; see the module docstring for the call contract."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if cfg.in_dim < 1:
      raise ValueError(f"dit.in_dim={cfg.in_dim}: set it to the data's token dim pt*ph*pw*latent channels")
    if cfg.width % cfg.num_heads:
      raise ValueError(f"dit.width={cfg.width} is not divisible by dit.num_heads={cfg.num_heads}")
    if cfg.text_encoder not in TEXT_ENCODERS:
      raise ValueError(f"dit.text_encoder={cfg.text_encoder!r} is unknown; accepted: {TEXT_ENCODERS}")
    head_dim = cfg.width // cfg.num_heads
    self.rope_dims = layers.rope_split(head_dim, 3)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    # The time path runs in float32 whatever the compute dtype: it is per segment (cheap), and the
    # modulation it feeds scales every activation.
    f32 = dict(dtype=jnp.float32, param_dtype=param_dtype)
    w = cfg.width
    with nnx.use_eager_sharding(False):
      self.x_embed = layers.Dense(cfg.in_dim, w, (None, "embed"), **kw, rngs=rngs)
      # dit.abs_pos: fractional (t, h, w) features through a zero-initialised layer (starts as without).
      self.pos_embed = (layers.Dense(6 * ABS_POS_FREQS, w, (None, "embed"), zero_init=True, **kw, rngs=rngs)
                        if cfg.abs_pos else None)
      self.cond_embed = layers.Dense(cfg.in_dim + 1, w, (None, "embed"), use_bias=False, zero_init=True,
                                     **kw, rngs=rngs)
      self.time_in = layers.Dense(cfg.time_freq_dim, w, (None, "embed"), **f32, rngs=rngs)
      self.time_out = layers.Dense(w, w, ("embed", None), **f32, rngs=rngs)
      self.time_mod = layers.Dense(w, (6, w), ("embed", None, None), zero_init=True, **f32, rngs=rngs)
      if cfg.text_encoder == "caption":
        self.text, text_dim = TextEncoder(cfg, rngs=rngs), cfg.text_width
      else:
        self.text, text_dim = None, cfg.text_dim
      self.text_in = layers.Dense(text_dim, w, (None, "embed"), **kw, rngs=rngs)
      self.text_out = layers.Dense(w, w, ("embed", None), **kw, rngs=rngs)
      self.blocks = layers.stack_layers(lambda r: DiTBlock(cfg, **kw, rngs=r), cfg.depth, rngs)
      self.final_norm = layers.LayerNorm(w, affine=False, **kw, rngs=rngs)
      self.final_mod = layers.param(rngs, nnx.initializers.zeros, (2, w), (None, "embed"), param_dtype)
      self.out = layers.Dense(w, cfg.in_dim, ("embed", None), zero_init=True, **kw, rngs=rngs)
    self.time_freq_dim, self.rope_theta, self.remat, self.dtype, self.mlp_conv = (
        cfg.time_freq_dim, cfg.rope_theta, cfg.remat, dtype, bool(cfg.mlp_conv))
    axes = tuple(cfg.attention_axes)
    if not axes or any(a not in ATTENTION_AXES for a in axes):
      raise ValueError(f"dit.attention_axes={axes} must name one or more of {ATTENTION_AXES}")
    # Block i attends as axes[i % len(axes)]; None: every block over its whole segment (Wan's).
    self.axes = None if set(axes) == {"full"} else tuple(ATTENTION_AXES.index(axes[i % len(axes)])
                                                         for i in range(cfg.depth))

  def _time(self, t):
    """The time embedding c [..., W] (float32) of t in [0, 1]."""
    return self.time_out(jax.nn.silu(self.time_in(timestep_embedding(t, self.time_freq_dim))))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, t: jax.Array,
               text: jax.Array, text_segment_ids: jax.Array, *, cond: jax.Array | None = None,
               cond_mask: jax.Array | None = None, text_drop: jax.Array | None = None) -> jax.Array:
    """x [B,L,D], positions int [B,L,3], segment_ids int [B,L], t [B,S], text [B,Lt] (ids) or [B,Lt,text_dim]
    (features) -> [B,L,D] float32."""
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
    if self.pos_embed is not None:
      h = h + self.pos_embed(fractional_positions(positions, seg))
    if cond is not None:
      gm = given[..., None].astype(x.dtype)
      h = h + self.cond_embed(jnp.concatenate([cond * gm, gm], axis=-1))
    h = sharding.constrain(h, ACT)

    # Time: one embedding per segment (and the t = 0 one for given tokens), projected once to the six
    # modulations every block adds its own table to.
    c_bsw = self._time(t)
    c0_w = self._time(jnp.zeros((), jnp.float32))
    mod_bs, mod0 = self.time_mod(jax.nn.silu(c_bsw)), self.time_mod(jax.nn.silu(c0_w))

    # Text: caption features (zero where text_drop hides a caption), then the two-layer projection.
    tseg = text_segment_ids.astype(jnp.int32)
    feats = self.text(text, tseg) if self.text is not None else text.astype(self.dtype)
    if text_drop is not None:
      drop_tok = jnp.take_along_axis(text_drop, jnp.clip(tseg - 1, 0, s - 1), axis=1) > 0
      feats = jnp.where(drop_tok[..., None], jnp.zeros((), feats.dtype), feats)
    kv = self.text_out(jax.nn.gelu(self.text_in(feats), approximate=True))

    angles = layers.rope_angles(positions, self.rope_dims, self.rope_theta)
    rows = row_one_hot(seg, given, s, jnp.float32)
    axis_ids = None if self.axes is None else attention_axis_ids(positions, seg)
    neighbours = spacetime_neighbours(positions, seg) if self.mlp_conv else None
    ctx = (seg, angles, mod_bs, mod0, rows, kv, tseg, axis_ids, neighbours)
    per_layer = None if self.axes is None else jnp.asarray(self.axes, jnp.int32)
    h = layers.scan_layers(self.blocks, h, lambda blk, h, *a: blk(h, ctx, *a), self.remat, per_layer)

    table = self.final_mod[...]
    shift, scale = (per_token_rows(c_bsw + table[i], c0_w + table[i], rows) for i in range(2))
    out = self.out(_modulate(self.final_norm(h), shift, scale).astype(h.dtype)).astype(jnp.float32)
    return jnp.where((seg > 0)[..., None], out, 0.0)
