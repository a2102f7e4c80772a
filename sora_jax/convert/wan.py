"""Converts Wan 2.1's text-to-video pipeline, as diffusers stores it, into a sora_jax inference bundle.

    python -m sora_jax.convert.wan --pipeline Wan2.1-T2V-1.3B-Diffusers --out runs/wan21_1.3b/bundle
    python -m sora_jax.sample --bundle runs/wan21_1.3b/bundle --prompt "..." --num_frames 81 \
        --height 480 --width 832 --out cat.mp4

The pipeline folder is what `WanPipeline.save_pretrained` writes: transformer/ (WanTransformer3DModel),
text_encoder/ (transformers UMT5EncoderModel), tokenizer/ (its sentencepiece `spiece.model`, which the
published folders ship), vae/ (AutoencoderKLWan), scheduler/ (FlowMatchEulerDiscreteScheduler or
UniPCMultistepScheduler with flow sigmas, the published default). Weights may be one safetensors file or
shards with an index. The bundle holds the DiT, the UMT5 encoder (beside the DiT: `dit.text_encoder =
"umt5"`), the VAE with Wan's latent statistics, the tokenizer, and a config whose `sample` and
`diffusion` sections reproduce the scheduler (sampler, time grid, constant shift) and Wan's defaults
(50 steps, guidance 5, 81 frames of 480x832 at 16 fps). tests/test_wan_pipeline_interop.py checks the
whole pipeline against diffusers' WanPipeline from the same noise.

The DiT: sora_jax's DiT block is Wan 2.1's (models/dit.py), so the conversion is a renaming and a re-layout of
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

import json
from pathlib import Path
from typing import Any, Mapping

from absl import app, flags
import numpy as np

from sora_jax.convert import safetensors_io
from sora_jax.convert.safetensors_io import ConversionError

T2V_REFUSED = {  # diffusers config keys that only image-to-video / later variants set
    "image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None}


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
      qk_norm=True, attention_axes=("full",), mlp_conv=False, abs_pos=False, text_encoder="umt5", text_dim=int(c["text_dim"]), attention="auto", context="none",
      remat="none", dtype=dtype, param_dtype="float32")
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


# ------------------------------------------------------------------------------------- the pipeline
# Wan 2.1's published defaults (diffusers' WanPipeline docs and the model cards): 81 frames at 480x832,
# 16 fps, guidance 5, 50 steps.
SAMPLE_DEFAULTS = dict(steps=50, guidance=5.0, num_frames=81, height=480, width=832, fps=16.0)


def scheduler_settings(sched: Mapping[str, Any]) -> tuple[dict, dict]:
  """(the config's `sample` keys, its `diffusion` keys) reproducing a diffusers scheduler_config.json."""
  name = sched.get("_class_name")
  if name == "FlowMatchEulerDiscreteScheduler":
    if sched.get("use_dynamic_shifting"):
      raise ConversionError("scheduler use_dynamic_shifting=true is not supported (Wan 2.1 uses a constant "
                            "shift)")
    sample, shift = dict(sampler="euler", time_grid="flow_match"), float(sched.get("shift", 1.0))
  elif name == "UniPCMultistepScheduler":
    if sched.get("prediction_type") != "flow_prediction" or not sched.get("use_flow_sigmas"):
      raise ConversionError(f"UniPC scheduler prediction_type={sched.get('prediction_type')!r}, "
                            f"use_flow_sigmas={sched.get('use_flow_sigmas')!r}; accepted: "
                            "'flow_prediction' with flow sigmas (Wan 2.1)")
    unipc = dict(order=int(sched.get("solver_order", 2)), variant=str(sched.get("solver_type", "bh2")),
                 lower_order_final=bool(sched.get("lower_order_final", True)),
                 disable_corrector=[int(k) for k in sched.get("disable_corrector", [])])
    if not sched.get("predict_x0", True):
      raise ConversionError("UniPC scheduler predict_x0=false is not supported (Wan 2.1: true)")
    sample, shift = dict(sampler="unipc", time_grid="unipc", unipc=unipc), float(sched.get("flow_shift", 1.0))
  else:
    raise ConversionError(f"scheduler {name!r} is not supported; accepted: FlowMatchEulerDiscreteScheduler, "
                          "UniPCMultistepScheduler (flow sigmas)")
  diffusion = dict(objective="flow", time_shift=True, shift_rule="constant", shift_scale=shift,
                   shift_ref_tokens=1)
  return sample, diffusion


def _json(path: Path, what: str) -> dict:
  if not path.is_file():
    raise ConversionError(f"{path}: no such file ({what})")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def pipeline_config(root: Path, *, dtype: str) -> dict:
  """The bundle's config (all sections) for a diffusers Wan pipeline folder, without reading weights."""
  from sora_jax.convert import umt5  # pylint: disable=g-import-not-at-top
  dit, patch = dit_config(_json(root / "transformer" / "config.json", "the transformer's config"), dtype=dtype)
  text = umt5.read_config(root / "text_encoder", dtype=dtype)
  if text["d_model"] != dit["text_dim"]:
    raise ConversionError(f"the text encoder's d_model {text['d_model']} is not the transformer's text_dim "
                          f"{dit['text_dim']}")
  sample, diffusion = scheduler_settings(_json(root / "scheduler" / "scheduler_config.json",
                                               "the scheduler's config"))
  sample.update(SAMPLE_DEFAULTS, row_len=0, max_tile_pixels=0)
  seq_len = (1 + (sample["num_frames"] - 1) // 4) * (sample["height"] // 16) * (sample["width"] // 16)
  return dict(seed=0, dit=dict(dit, patch=list(patch)), text=text, diffusion=diffusion, sample=sample,
              data=dict(source="latents", seq_len=int(seq_len)))


def run(pipeline_dir: str | Path, out: str | Path, *, dtype: str = "bfloat16",
        weights_dtype: str = "float32") -> dict:
  """Converts the pipeline folder into the bundle `out`; returns the bundle's manifest.

  `dtype`: the compute dtype the bundle's models run in; `weights_dtype`: how its weights are stored.
  """
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.convert import safetensors_io, umt5, wan_vae  # pylint: disable=g-import-not-at-top
  root = Path(pipeline_dir)
  if not root.is_dir():
    raise ConversionError(f"--pipeline {root}: no such directory (a diffusers Wan pipeline folder)")
  cfg = pipeline_config(root, dtype=dtype)
  spiece = root / "tokenizer" / "spiece.model"
  if not spiece.is_file():
    raise ConversionError(f"{spiece}: no such file (the UMT5 tokenizer's sentencepiece model, which the "
                          "published Wan 2.1 folders ship; tokenizer.json alone is not read)")
  dit = dit_params(safetensors_io.read(root / "transformer"), cfg["dit"], tuple(cfg["dit"]["patch"]))
  _, dit["text"] = umt5.convert(root / "text_encoder", dtype=dtype)
  vae_tensors = {k: np.asarray(v, np.float32) for k, v in safetensors_io.read(root / "vae").items()}
  vae_settings = wan_vae.infer_settings(vae_tensors)
  vae_cfg_path = root / "vae" / "config.json"
  vae_dcfg = _json(vae_cfg_path, "the VAE's config") if vae_cfg_path.is_file() else None
  if vae_dcfg is not None:
    wan_vae.check_diffusers_config(vae_dcfg, vae_settings)
  stats = wan_vae.latent_stats(vae_dcfg, vae_settings)
  cfg["vae"] = dict(wan_vae.settings_dict(vae_settings), dtype=dtype)
  if vae_settings.temporal_factor != 4 or vae_settings.spatial_factor != 8:
    raise ConversionError(f"the VAE compresses {vae_settings.temporal_factor}x{vae_settings.spatial_factor}"
                          "x; Wan 2.1's is 4x8x8")
  if cfg["dit"]["in_dim"] != vae_settings.z_dim * int(np.prod(cfg["dit"]["patch"])):
    raise ConversionError(f"the transformer reads {cfg['dit']['in_dim']} values per token; the VAE's "
                          f"{vae_settings.z_dim} channels in patches of {cfg['dit']['patch']} give "
                          f"{vae_settings.z_dim * int(np.prod(cfg['dit']['patch']))}")
  vae = wan_vae.convert(vae_tensors, vae_settings)
  source = {"format": "diffusers WanPipeline (Wan 2.1 text-to-video)", "pipeline": str(root.absolute()),
            "latent_stats": stats["source"]}
  return bundle_lib.write(out, config=cfg, dit_params=dit, vae_params=vae, tokenizer_model=spiece,
                          latent_stats=stats, dtype=weights_dtype, source=source)


def _define_flags() -> dict:
  # Defined only when run as a program, so that importing this module leaves other entry points' flags alone.
  return {
      "pipeline": flags.DEFINE_string("pipeline", None, "a diffusers Wan 2.1 pipeline folder (save_pretrained)"),
      "out": flags.DEFINE_string("out", None, "the bundle to write (a new or empty directory, or a bundle)"),
      "dtype": flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype of the models"),
      "weights_dtype": flags.DEFINE_enum("weights_dtype", "float32", ["float32", "bfloat16"],
                                         "how the bundle stores the weights"),
  }


def main(argv, f: dict):
  del argv
  pipeline, out = f["pipeline"].value, f["out"].value

  def report(manifest, seconds):
    n = manifest["parameters"]
    return (f"[convert] {pipeline} -> {out}: DiT {n['dit'] / 1e6:.2f}M, text encoder "
            f"{n['text_encoder'] / 1e6:.2f}M, VAE {n['vae'] / 1e6:.2f}M parameters; {seconds:.1f}s")

  safetensors_io.run_converter(
      {"pipeline": pipeline, "out": out},
      lambda: run(pipeline, out, dtype=f["dtype"].value, weights_dtype=f["weights_dtype"].value), report)

if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
