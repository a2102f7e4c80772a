"""Converts the Wan 2.1 video VAE, as diffusers' `AutoencoderKLWan` stores it, into a sora_jax VAE run.

    python -m sora_jax.convert.wan_vae --input vae/diffusion_pytorch_model.safetensors --out runs/wan21/vae

`--input` is the safetensors file (or the directory holding `diffusion_pytorch_model.safetensors`);
diffusers' `config.json` beside it is read when present (`--diffusers_config` names another). The
architecture is read off the tensor shapes, so the file alone is enough, and checked against that config.
No torch is needed: convert/safetensors_io.py reads the file.

The output directory is laid out as the VAE trainer leaves its work directory, so `reconstruct --vae
DIR`, `encode_latents.py --vae DIR` and the bundle export (with DIR as the run's `vae/`) load it like
a trained VAE:

    DIR/checkpoints/0/state   orbax PyTree {"step", "params", "ema"} (params == ema: converted weights)
    DIR/config.json           {"vae": {...}}: the sora_jax VAE settings these weights need
    DIR/latent_stats.json     {"shift": [c], "scale": [c], "vae": {...}, "source": ...}: Wan's published
                              latents_mean / latents_std (models see (z - shift) / scale)
    DIR/conversion.json       where the weights came from (path, SHA-256, diffusers config)

Layout mapping: diffusers' module names are sora_jax's (models/vae.py mirrors them), except that the
resamplers' `resample.1` (the conv after the pad / upsample in an nn.Sequential) is `resample`.
Tensors: conv `weight [O, I, kt, kh, kw]` -> `kernel [kt, kh, kw, I, O]`, 2D `[O, I, kh, kw]` ->
`[kh, kw, I, O]`, RMS-norm `gamma [C, 1, ...]` -> `[C]`; biases are unchanged. Every tensor must land
on a parameter of the same shape and every parameter must be filled; otherwise the conversion stops
with one line naming the tensor. Wan 2.2's residual layout (`is_residual`), patchified inputs and
encoder attention (`attn_scales`) are refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from absl import app, flags
import numpy as np

from sora_jax import bundle as bundle_lib
from sora_jax.convert import safetensors_io
from sora_jax.convert.safetensors_io import ConversionError
from sora_jax.models import vae as vae_lib

FILE_NAME = "diffusion_pytorch_model.safetensors"

# diffusers' AutoencoderKLWan defaults: the per-channel latent statistics Wan 2.1 was published with.
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# ------------------------------------------------------------------------------------ safetensors
def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors checkpoint (file, sharded index, or directory) as float32 numpy."""
  return {k: v.astype(np.float32) for k, v in safetensors_io.read(path).items()}


# ------------------------------------------------------------------------------ the architecture
def infer_settings(tensors: Mapping[str, np.ndarray]) -> vae_lib.VAESettings:
  """sora_jax VAE settings read off the tensor shapes of an AutoencoderKLWan state dict."""

  def shape(key: str) -> tuple[int, ...]:
    if key not in tensors:
      raise ConversionError(f"tensor {key} is missing: this is not an AutoencoderKLWan state dict")
    return tuple(tensors[key].shape)

  base_dim, in_channels = shape("encoder.conv_in.weight")[:2]
  z_dim = shape("post_quant_conv.weight")[0]
  blocks: dict[int, set[str]] = {}
  for key in tensors:
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(.+)$", key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
  # The encoder's down_blocks are flat: residual blocks, a resampler closing each level but the last.
  levels, temporal, current = [], [], []
  for i in sorted(blocks):
    names = blocks[i]
    if "resample.1.weight" in names:
      levels.append(current)
      temporal.append("time_conv.weight" in names)
      current = []
    elif "conv1.weight" in names:
      current.append(shape(f"encoder.down_blocks.{i}.conv1.weight")[0])
    else:
      raise ConversionError(
          f"encoder.down_blocks.{i} holds {sorted(names)[:4]}...: neither a residual block nor a "
          "resampler (Wan 2.2's residual layout and encoder attention are not supported)")
  levels.append(current)
  counts = sorted({len(level) for level in levels})
  if len(counts) != 1 or counts[0] == 0:
    raise ConversionError(f"encoder levels hold {[len(l) for l in levels]} residual blocks; "
                          "AutoencoderKLWan has the same number (num_res_blocks) at every level")
  dim_mult = []
  for level in levels:
    if len(set(level)) != 1 or level[0] % base_dim:
      raise ConversionError(f"encoder level widths {level} are not one multiple of base_dim {base_dim}")
    dim_mult.append(level[0] // base_dim)
  decoder_width = shape("decoder.conv_in.weight")[0]
  if decoder_width % dim_mult[-1]:
    raise ConversionError(f"decoder.conv_in has {decoder_width} outputs, not a multiple of "
                          f"dim_mult[-1]={dim_mult[-1]}")
  decoder_base = decoder_width // dim_mult[-1]
  out_channels = shape("decoder.conv_out.weight")[0]
  if out_channels != in_channels:
    raise ConversionError(f"the encoder takes {in_channels} channels but the decoder gives "
                          f"{out_channels}; sora_jax's VAE needs them equal")
  return vae_lib.settings(dict(
      base_dim=base_dim, dim_mult=tuple(dim_mult), num_res_blocks=counts[0], z_dim=z_dim,
      temporal_downsample=tuple(temporal), in_channels=in_channels, patch_size=1,
      decoder_base_dim=0 if decoder_base == base_dim else decoder_base))


def check_diffusers_config(hf: Mapping[str, Any], s: vae_lib.VAESettings) -> None:
  """Raises if diffusers' config.json describes another architecture than the tensors, or one that
  sora_jax's VAE does not implement."""
  if hf.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
    raise ConversionError(f"config _class_name {hf['_class_name']!r}; accepted: 'AutoencoderKLWan'")
  if hf.get("is_residual", False):
    raise ConversionError("config is_residual=true (the Wan 2.2 VAE); only the Wan 2.1 layout converts")
  if hf.get("patch_size") not in (None, 1):
    raise ConversionError(f"config patch_size={hf['patch_size']}; accepted: null (Wan 2.1)")
  if hf.get("attn_scales"):
    raise ConversionError(f"config attn_scales={hf['attn_scales']}; accepted: [] (Wan 2.1)")
  decoder_base = hf.get("decoder_base_dim") or hf.get("base_dim", s.base_dim)
  want = {"base_dim": s.base_dim, "z_dim": s.z_dim, "dim_mult": list(s.dim_mult),
          "num_res_blocks": s.num_res_blocks, "temperal_downsample": list(s.temporal_downsample),
          "in_channels": s.in_channels, "out_channels": s.in_channels}
  for key, value in want.items():
    if key in hf and hf[key] != value:
      raise ConversionError(f"config {key}={hf[key]} but the tensors are of a model with {value}")
  if decoder_base != (s.decoder_base_dim or s.base_dim):
    raise ConversionError(f"config decoder_base_dim={decoder_base} but the tensors are of a model "
                          f"with {s.decoder_base_dim or s.base_dim}")


# ---------------------------------------------------------------------------------- the tensors
def sora_path(name: str) -> str:
  """The '/'-joined sora_jax parameter path of a diffusers tensor name."""
  parts = name.replace(".resample.1.", ".resample.").split(".")
  if parts[-1] == "weight":
    parts[-1] = "kernel"
  return "/".join(parts)


def sora_tensor(name: str, x: np.ndarray) -> np.ndarray:
  """A diffusers tensor in sora_jax's layout (channels-last kernels, flat norm scales)."""
  if name.endswith(".weight") and x.ndim == 5:   # [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]
    return np.ascontiguousarray(x.transpose(2, 3, 4, 1, 0))
  if name.endswith(".weight") and x.ndim == 4:   # [O, I, kh, kw] -> [kh, kw, I, O]
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  if name.endswith(".gamma"):
    return x.reshape(-1)
  return x


def _flatten(tree, prefix: str = ""):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}" if prefix else str(k))
  else:
    yield prefix, tree


def _unflatten_like(like, flat: Mapping[str, np.ndarray], prefix: str = ""):
  if isinstance(like, Mapping):
    return {k: _unflatten_like(v, flat, f"{prefix}/{k}" if prefix else str(k)) for k, v in like.items()}
  return flat[prefix]


def convert(tensors: Mapping[str, np.ndarray], s: vae_lib.VAESettings) -> dict:
  """sora_jax VAE parameters (the pure-dict state a trainer checkpoints) from diffusers tensors."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: vae_lib.VAE(s, rngs=nnx.Rngs(0)))
  want = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  shapes = {k: tuple(v.shape) for k, v in _flatten(want)}
  got = {}
  for name, x in tensors.items():
    path = sora_path(name)
    if path not in shapes:
      raise ConversionError(f"tensor {name} has no place in sora_jax's VAE (no parameter {path})")
    y = sora_tensor(name, np.asarray(x, np.float32))
    if y.shape != shapes[path]:
      raise ConversionError(f"tensor {name} {list(x.shape)} becomes {list(y.shape)}, but {path} is "
                            f"{list(shapes[path])}")
    got[path] = y
  missing = sorted(set(shapes) - set(got))
  if missing:
    raise ConversionError(f"{len(missing)} sora_jax parameters have no tensor, first {missing[0]}")
  return _unflatten_like(want, got)


def latent_stats(diffusers_cfg: Mapping[str, Any] | None, s: vae_lib.VAESettings) -> dict:
  """Per-channel shift and scale: the config's latents_mean/std, else Wan 2.1's for 16 channels."""
  hf = diffusers_cfg or {}
  mean, std = hf.get("latents_mean"), hf.get("latents_std")
  if mean is not None and std is not None and len(mean) == len(std) == s.z_dim:
    shift, scale, source = mean, std, "diffusers config latents_mean / latents_std"
  elif s.z_dim == len(WAN21_LATENTS_MEAN):
    shift, scale = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
    source = "Wan 2.1 published latents_mean / latents_std (no config with 16 of them given)"
  else:
    shift, scale = (0.0,) * s.z_dim, (1.0,) * s.z_dim
    source = f"identity: no latents_mean / latents_std of {s.z_dim} channels given"
  if min(scale) <= 0:
    raise ConversionError(f"latents_std {list(scale)} must be positive")
  return {"shift": [float(v) for v in shift], "scale": [float(v) for v in scale],
          "vae": settings_dict(s), "source": source}


def settings_dict(s: vae_lib.VAESettings) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}


# ---------------------------------------------------------------------------------------- output
def resolve_input(path: str | os.PathLike) -> Path:
  p = Path(path)
  if p.is_dir():
    p = p / FILE_NAME
  if not p.is_file():
    raise ConversionError(f"--input {path}: no such file (give the .safetensors file or the "
                          f"directory holding {FILE_NAME})")
  return p


def run(input_path: str | os.PathLike, out: str | os.PathLike, *,
        diffusers_config: str | os.PathLike | None = None) -> dict:
  """Converts `input_path` into the VAE run directory `out`; returns what conversion.json records."""
  from sora_jax import checkpoint  # pylint: disable=g-import-not-at-top
  src = resolve_input(input_path)
  out = Path(out)
  if out.exists() and any(out.iterdir()):
    raise ConversionError(f"--out {out} is not empty; give a new directory (a VAE run's checkpoints "
                          "are never overwritten)")
  cfg_path = Path(diffusers_config) if diffusers_config else src.parent / "config.json"
  if diffusers_config and not cfg_path.is_file():
    raise ConversionError(f"--diffusers_config {diffusers_config}: no such file")
  dcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
  tensors = read_safetensors(src)
  s = infer_settings(tensors)
  if dcfg is not None:
    check_diffusers_config(dcfg, s)
  params = convert(tensors, s)
  stats = latent_stats(dcfg, s)
  out.mkdir(parents=True, exist_ok=True)
  mgr = checkpoint.Manager(str(out / "checkpoints"))
  mgr.save(0, {"step": np.int32(0), "params": params, "ema": params}, force=True)
  mgr.close()
  (out / "config.json").write_text(json.dumps({"vae": settings_dict(s)}, indent=2, sort_keys=True))
  (out / "latent_stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
  record = {"format": "diffusers AutoencoderKLWan (Wan 2.1 layout)", "input": str(src.absolute()),
            "sha256": bundle_lib.sha256(src), "bytes": src.stat().st_size, "tensors": len(tensors),
            "parameters": int(sum(x.size for x in tensors.values())),
            "diffusers_config": dcfg, "vae": settings_dict(s), "latent_stats_source": stats["source"]}
  (out / "conversion.json").write_text(json.dumps(record, indent=2, sort_keys=True))
  return record


def _define_flags() -> dict:
  # Defined only when run as a program: library users (tests, other entry points) keep their own
  # --out / --input flags.
  return {
      "input": flags.DEFINE_string("input", None, f"the {FILE_NAME} file, or its directory"),
      "out": flags.DEFINE_string("out", None, "the VAE run directory to create (must be new or empty)"),
      "diffusers_config": flags.DEFINE_string(
          "diffusers_config", None, "diffusers config.json; default: the one beside --input, if any"),
  }


def main(argv, flag_values: dict):
  del argv
  src, out = flag_values["input"].value, flag_values["out"].value

  def report(record, seconds):
    v = record["vae"]
    return (f"[convert] {record['input']} -> {out}: {record['tensors']} tensors, "
            f"{record['parameters'] / 1e6:.2f}M params, base_dim {v['base_dim']}, dim_mult {v['dim_mult']}, "
            f"z_dim {v['z_dim']}, temporal_downsample {v['temporal_downsample']}; latent stats: "
            f"{record['latent_stats_source']}; {seconds:.1f}s")

  safetensors_io.run_converter(
      {"input": src, "out": out},
      lambda: run(src, out, diffusers_config=flag_values["diffusers_config"].value), report)

if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
