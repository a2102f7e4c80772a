"""UMT5's encoder, the caption encoder of Wan 2.1, equal to transformers' `UMT5EncoderModel`.

Wan's DiT cross-attends to the last hidden state of google/umt5-xxl's encoder, so converting Wan
(sora_jax/convert/wan.py) needs this network with the published weights (sora_jax/convert/umt5.py):

    ids [B, L] int32, segment_ids [B, L] int32 -> hidden states [B, L, d_model] float32

What makes it UMT5 and not the project's own text encoder (models/text.py): a learned relative
position bias in every layer (T5 has one, in layer 0, shared by all), added to attention logits that
are not scaled by 1/sqrt(d_kv); T5's RMS norm (no mean, no bias) before each sublayer and at the end;
a gated-GELU feed-forward (tanh GELU, transformers' "gelu_new"); no biases anywhere; no embedding scale.

A row may hold several captions packed one after the other (segment ids 1..S, 0 = padding): a token
attends only to its own caption, and the relative positions of two tokens of one caption are their
distance in the row, the same as when the caption is alone. So every caption's states equal those of
transformers run on that caption alone with its attention mask. Captions must be contiguous in the
row (packing makes them so). The states at padding positions are not meaningful (they attend to the
whole row): callers zero them, as diffusers' WanPipeline does.

Precision: parameters in `param_dtype`; matmul inputs in the compute `dtype` with float32 accumulation
(layers.Dense); the residual stream, norms, softmax and the output in float32. transformers keeps `wo`
in float32 because fp16 overflows there; bf16 has float32's range, so `wo` runs in `dtype` like the rest.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import sharding
from sora_jax.models import layers

ENCODER = "umt5"
# Wan's max_sequence_length: captions are cut to 511 pieces plus EOS.
WAN_MAX_LEN = 512
CONFIG_KEYS = ("encoder", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
               "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
               "max_len", "dtype", "param_dtype", "remat")
# Logits of masked pairs: finite, so a padding query (which no key matches) gets uniform weights, not NaN.
_MASKED = -1e30


def text_config(hf_config: Mapping[str, Any], *, max_len: int = WAN_MAX_LEN, dtype: str = "bfloat16",
                param_dtype: str = "float32", remat: str = "none") -> dict:
  """The `cfg.text` section for a transformers UMT5 `config.json` (as a dict)."""
  model_type = hf_config.get("model_type")
  if model_type != "umt5":
    raise ValueError(f"config model_type={model_type!r}; accepted: 'umt5' (T5 and mT5 share one relative "
                     "position bias across layers, which this encoder does not implement)")
  if hf_config.get("is_decoder", False):
    raise ValueError("config is_decoder=true; accepted: an encoder config (UMT5EncoderModel)")
  ffn = hf_config.get("feed_forward_proj", "gated-gelu")
  if ffn != "gated-gelu":
    raise ValueError(f"config feed_forward_proj={ffn!r}; accepted: 'gated-gelu' (UMT5's)")
  sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
  missing = [k for k in sizes if k not in hf_config]
  if missing:
    raise ValueError(f"config lacks {missing}; a UMT5 config.json names {list(sizes)}")
  cfg = {k: int(hf_config[k]) for k in sizes}
  # UMT5Config's defaults, which transformers applies to keys a config.json leaves out.
  cfg.update(relative_attention_num_buckets=int(hf_config.get("relative_attention_num_buckets", 32)),
             relative_attention_max_distance=int(hf_config.get("relative_attention_max_distance", 128)),
             layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-6)))
  cfg.update(encoder=ENCODER, max_len=int(max_len), dtype=dtype, param_dtype=param_dtype, remat=remat)
  return {k: cfg[k] for k in CONFIG_KEYS}


def relative_position_buckets(relative_position: np.ndarray, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bidirectional bucket of each `key position - query position` (int array of any shape).

  Half the buckets hold keys after the query, half before; in each half, distances below a quarter
  of num_buckets get one bucket each and longer ones logarithmically wider buckets, up to max_distance
  and beyond it the last. The log is taken in float32 as transformers does, so the integer cuts fall
  on the same distances.
  """
  half = num_buckets // 2
  exact = half // 2
  rel = np.asarray(relative_position, np.int64)
  dist = np.abs(rel)
  ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
  ratio = ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
  far = np.minimum(exact + ratio.astype(np.int64), half - 1)
  return (np.where(rel > 0, half, 0) + np.where(dist < exact, dist, far)).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _bucket_grid(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """[L, L] buckets of key j for query i (a constant: the row length is static)."""
  idx = np.arange(length)
  return relative_position_buckets(idx[None, :] - idx[:, None], num_buckets, max_distance)


class HeadsOut(nnx.Module):
  """[..., H, Dh] -> [..., D] without a bias: the attention output projection."""

  def __init__(self, heads: int, head_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
    self.kernel = layers.param(rngs, init, (heads, head_dim, out_dim), ("heads", "head_dim", "embed"),
                               param_dtype)
    self.dtype = dtype

  def __call__(self, x_blhd: jax.Array) -> jax.Array:
    y = jnp.einsum("blhd,hde->ble", x_blhd.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return y.astype(self.dtype)


class SelfAttention(nnx.Module):
  """Unscaled multi-head self-attention with this layer's relative position bias, under a pair mask."""

  def __init__(self, d_model: int, heads: int, d_kv: int, num_buckets: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = layers.Dense(d_model, (heads, d_kv), ("embed", "heads", "head_dim"), **kw)
    self.k = layers.Dense(d_model, (heads, d_kv), ("embed", "heads", "head_dim"), **kw)
    self.v = layers.Dense(d_model, (heads, d_kv), ("embed", "heads", "head_dim"), **kw)
    self.o = HeadsOut(heads, d_kv, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.rel_bias = layers.param(rngs, nnx.initializers.normal(d_model ** -0.5), (num_buckets, heads),
                                 (None, "heads"), param_dtype)
    self.dtype = dtype

  def __call__(self, x_bld: jax.Array, buckets_ll: jax.Array, mask_bll: jax.Array) -> jax.Array:
    names = ("act_batch", "act_seq", "act_heads", None)
    q = sharding.constrain(self.q(x_bld), names)
    k = sharding.constrain(self.k(x_bld), names)
    v = sharding.constrain(self.v(x_bld), names)
    bias_hll = jnp.take(self.rel_bias[...].astype(jnp.float32), buckets_ll, axis=0).transpose(2, 0, 1)
    # No 1/sqrt(d_kv): T5 folds it into the initialisation of q, and the published weights expect none.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias_hll
    logits = jnp.where(mask_bll[:, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v, preferred_element_type=jnp.float32)
    return self.o(sharding.constrain(out.astype(self.dtype), names))


class GatedGeluFFN(nnx.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x), no biases."""

  def __init__(self, d_model: int, d_ff: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi_0 = layers.Dense(d_model, d_ff, ("embed", "mlp"), **kw)
    self.wi_1 = layers.Dense(d_model, d_ff, ("embed", "mlp"), **kw)
    self.wo = layers.Dense(d_ff, d_model, ("mlp", "embed"), **kw)

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    gate = jax.nn.gelu(self.wi_0(x_bld).astype(jnp.float32), approximate=True)
    h = gate * self.wi_1(x_bld).astype(jnp.float32)
    return self.wo(sharding.constrain(h, ("act_batch", "act_seq", "act_mlp")))


class UMT5Layer(nnx.Module):
  """x + attn(norm(x)), then x + ffn(norm(x)); the residual stream stays float32."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d_model, eps = cfg["d_model"], cfg["layer_norm_epsilon"]
    self.attn_norm = layers.RMSNorm(d_model, eps=eps, **kw)
    self.attn = SelfAttention(d_model, cfg["num_heads"], cfg["d_kv"], cfg["relative_attention_num_buckets"],
                              **kw)
    self.ffn_norm = layers.RMSNorm(d_model, eps=eps, **kw)
    self.ffn = GatedGeluFFN(d_model, cfg["d_ff"], **kw)

  def __call__(self, x_bld, buckets_ll, mask_bll):
    x = x_bld + self.attn(self.attn_norm(x_bld), buckets_ll, mask_bll).astype(jnp.float32)
    x = x + self.ffn(self.ffn_norm(x)).astype(jnp.float32)
    return sharding.constrain(x, ("act_batch", "act_seq", "act_embed"))


class UMT5Encoder(nnx.Module):
  """ids [B, L] int32, segment_ids [B, L] int32 (0 = padding) -> float32 [B, L, d_model].

  `cfg`: a dict or ConfigDict with CONFIG_KEYS (see `text_config`); ids outside the vocabulary are
  clipped into it. Padding positions' outputs are meaningless (the module docstring says why).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    if cfg["encoder"] != ENCODER:
      raise ValueError(f"text encoder={cfg['encoder']!r}; UMT5Encoder builds {ENCODER!r}")
    dtype, param_dtype = jnp.dtype(cfg["dtype"]), jnp.dtype(cfg["param_dtype"])
    with nnx.use_eager_sharding(False):  # annotated, but constructible outside a mesh (as models/text.py)
      self.embed = layers.param(rngs, nnx.initializers.normal(1.0), (cfg["vocab_size"], cfg["d_model"]),
                                ("vocab", "embed"), param_dtype)
      self.layers = layers.stack_layers(
          lambda r: UMT5Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg["num_layers"], rngs)
      self.final_norm = layers.RMSNorm(cfg["d_model"], eps=cfg["layer_norm_epsilon"], dtype=jnp.float32,
                                       param_dtype=param_dtype, rngs=rngs)
    self.vocab_size, self.remat = cfg["vocab_size"], cfg["remat"]
    self.num_buckets = cfg["relative_attention_num_buckets"]
    self.max_distance = cfg["relative_attention_max_distance"]

  def __call__(self, ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
    ids = jnp.clip(ids, 0, self.vocab_size - 1)
    x = jnp.take(self.embed[...], ids, axis=0).astype(jnp.float32)
    x = sharding.constrain(x, ("act_batch", "act_seq", "act_embed"))
    # Within a contiguous caption, row distance is caption distance: one [L, L] grid serves every row.
    buckets = jnp.asarray(_bucket_grid(ids.shape[1], self.num_buckets, self.max_distance))
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    x = layers.scan_layers(self.layers, x, lambda layer, x: layer(x, buckets, mask), self.remat)
    return self.final_norm(x)
