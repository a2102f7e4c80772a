"""Converts Wan 2.1's text-to-video DiT, as diffusers' `WanTransformer3DModel` stores it, into sora_jax's DiT.

sora_jax's DiT block is Wan 2.1's (models/dit.py), so the conversion is a renaming and a re-layout of
tensors, with no approximation:

    diffusers                                        sora_jax DiT
    patch_embedding.weight [W, C, pt, ph, pw]         x_embed.kernel [pt*ph*pw*C, W] (tokens are (t,h,w,c))
    condition_embedder.time_embedder.linear_1/2       time_in / time_out
    condition_embedder.time_proj [6W, W]              time_mod.kernel [W, 6, W]
    condition_embedder.text_embedder.linear_1/2       text_in / text_out
    blocks.i.attn1.to_q/to_k/to_v [H*Dh, W]           blocks.attn.q/k/v.kernel [i, W, H, Dh]
    blocks.i.attn1.to_out.0 [W, H*Dh]                 blocks.attn.o.kernel [i, H, Dh, W]
    blocks.i.attn1.norm_q/norm_k [H*Dh]               blocks.attn.q_norm/k_norm.scale [i, H, Dh]
    blocks.i.attn2.*                                  blocks.cross.* (the same)
    blocks.i.norm2 (affine layer norm)                blocks.norm_cross.scale/bias
    blocks.i.ffn.net.0.proj / net.2                   blocks.mlp.up / down
    blocks.i.scale_shift_table [1, 6, W]              blocks.mod [i, 6, W]
    scale_shift_table [1, 2, W]                       final_mod [2, W]
    proj_out [pt*ph*pw*C, W] (outputs (t,h,w,c))      out.kernel [W, pt*ph*pw*C]

sora_jax's conditioning path (`cond_embed`, image/video prompts) has no Wan counterpart and starts at zero,
which is exactly "no conditioning". Every tensor must be used and every parameter filled; the
architecture is read from diffusers' config.json and checked against the tensor shapes. Wan 2.1's
image-to-video variant (image embedder, added k/v projections) and Wan 2.2's per-token timesteps are
refused with one line.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

T2V_REFUSED = {  # diffusers config keys that only image-to-video / later variants set
    "image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None}


class ConversionError(ValueError):
  """Input that is not a convertible Wan 2.1 text-to-video checkpoint."""


def dit_config(diffusers_cfg: Mapping[str, Any], *, dtype: str = "bfloat16") -> tuple[dict, tuple[int, int, int]]:
  """(sora_jax's `dit` config section, the patch size) for a diffusers WanTransformer3DModel config.json;
  `dtype` is the compute dtype the DiT will run in (its parameters stay float32)."""
  c = dict(diffusers_cfg)
  for key, want in T2V_REFUSED.items():
    if c.get(key) != want:
      raise ConversionError(f"transformer config {key}={c.get(key)!r}: only Wan 2.1 text-to-video "
                            f"({key}={want!r}) is supported")
  checks = {"qk_norm": "rms_norm_across_heads", "cross_attn_norm": True, "eps": 1e-6}
  for key, want in checks.items():
    if c.get(key, want) != want:
      raise ConversionError(f"transformer config {key}={c.get(key)!r}; accepted: {want!r} (Wan 2.1)")
  out_channels = c.get("out_channels") or c["in_channels"]
  if out_channels != c["in_channels"]:
    raise ConversionError(f"transformer config out_channels={out_channels} differs from in_channels="
                          f"{c['in_channels']}; sora_jax's DiT predicts the latents it is given")
  patch = tuple(int(p) for p in c.get("patch_size", (1, 2, 2)))
  heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
  dit = dict(
      in_dim=int(np.prod(patch)) * int(c["in_channels"]), width=heads * head_dim, depth=int(c["num_layers"]),
      num_heads=heads, ffn_dim=int(c["ffn_dim"]), time_freq_dim=int(c["freq_dim"]), rope_theta=10000.0,
      qk_norm=True, text_encoder="umt5", text_dim=int(c["text_dim"]), attention="auto", remat="none",
      dtype=dtype, param_dtype="float32")
  return dit, patch


class _Tensors:
  """The checkpoint's tensors, handed out once each, so unused ones can be reported."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self._t = dict(tensors)
    self._used: set[str] = set()

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self._t:
      raise ConversionError(f"tensor {name} is missing from the checkpoint")
    x = np.asarray(self._t[name], np.float32)
    if x.shape != shape:
      raise ConversionError(f"tensor {name} has shape {list(x.shape)}; the config needs {list(shape)}")
    self._used.add(name)
    return x

  def check_all_used(self) -> None:
    left = sorted(set(self._t) - self._used)
    if left:
      raise ConversionError(f"{len(left)} tensors have no place in sora_jax's DiT, e.g. {left[:3]}")


def _linear(t: _Tensors, name: str, din: int, dout: int) -> dict:
  """torch Linear [out, in] -> Dense {kernel [in, out], bias [out]}."""
  return {"kernel": t.take(f"{name}.weight", (dout, din)).T, "bias": t.take(f"{name}.bias", (dout,))}


def _attention(t: _Tensors, name: str, w: int, heads: int) -> dict:
  dh = w // heads
  out = {}
  for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
    lin = _linear(t, f"{name}.{theirs}", w, w)
    out[ours] = {"kernel": lin["kernel"].reshape(w, heads, dh), "bias": lin["bias"].reshape(heads, dh)}
  lin = _linear(t, f"{name}.to_out.0", w, w)
  out["o"] = {"kernel": lin["kernel"].reshape(heads, dh, w), "bias": lin["bias"]}
  for ours, theirs in (("q_norm", "norm_q"), ("k_norm", "norm_k")):
    out[ours] = {"scale": t.take(f"{name}.{theirs}.weight", (w,)).reshape(heads, dh)}
  return out


def _block(t: _Tensors, i: int, cfg: Mapping[str, Any]) -> dict:
  w, heads, f = cfg["width"], cfg["num_heads"], cfg["ffn_dim"]
  p = f"blocks.{i}"
  return {
      "attn": _attention(t, f"{p}.attn1", w, heads),
      "cross": _attention(t, f"{p}.attn2", w, heads),
      "norm_cross": {"scale": t.take(f"{p}.norm2.weight", (w,)), "bias": t.take(f"{p}.norm2.bias", (w,))},
      "mlp": {"up": _linear(t, f"{p}.ffn.net.0.proj", w, f), "down": _linear(t, f"{p}.ffn.net.2", f, w)},
      "mod": t.take(f"{p}.scale_shift_table", (1, 6, w))[0],
  }


def dit_params(tensors: Mapping[str, np.ndarray], cfg: Mapping[str, Any], patch: tuple[int, int, int]) -> dict:
  """sora_jax DiT parameters (a pure dict, float32, layers stacked) from diffusers' tensors, given
  `dit_config`'s outputs."""
  t = _Tensors(tensors)
  w, din, (pt, ph, pw) = cfg["width"], cfg["in_dim"], patch
  c = din // (pt * ph * pw)
  patch_w = t.take("patch_embedding.weight", (w, c, pt, ph, pw))
  emb = "condition_embedder"
  time_mod = _linear(t, f"{emb}.time_proj", w, 6 * w)
  blocks = [_block(t, i, cfg) for i in range(cfg["depth"])]
  params = {
      "x_embed": {"kernel": patch_w.transpose(2, 3, 4, 1, 0).reshape(din, w),
                  "bias": t.take("patch_embedding.bias", (w,))},
      "cond_embed": {"kernel": np.zeros((din + 1, w), np.float32)},
      "time_in": _linear(t, f"{emb}.time_embedder.linear_1", cfg["time_freq_dim"], w),
      "time_out": _linear(t, f"{emb}.time_embedder.linear_2", w, w),
      "time_mod": {"kernel": time_mod["kernel"].reshape(w, 6, w), "bias": time_mod["bias"].reshape(6, w)},
      "text_in": _linear(t, f"{emb}.text_embedder.linear_1", cfg["text_dim"], w),
      "text_out": _linear(t, f"{emb}.text_embedder.linear_2", w, w),
      "blocks": _stack(blocks),
      "final_mod": t.take("scale_shift_table", (1, 2, w))[0],
      "out": _linear(t, "proj_out", w, din),
  }
  t.check_all_used()
  return params


def _stack(trees: list) -> Any:
  if isinstance(trees[0], dict):
    return {k: _stack([tr[k] for tr in trees]) for k in trees[0]}
  return np.stack(trees)
