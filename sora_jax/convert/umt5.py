"""Converts transformers' `UMT5EncoderModel` (the `text_encoder/` of a diffusers Wan 2.1 pipeline) into
sora_jax's UMT5Encoder (models/umt5.py), without torch:

    text_cfg, params = umt5.convert("Wan2.1-T2V-1.3B-Diffusers/text_encoder")   # cfg.text, pure dict
    encoder, text_cfg = umt5.load("Wan2.1-T2V-1.3B-Diffusers/text_encoder", dtype="bfloat16")

The directory holds transformers' `config.json` and the weights (one `model.safetensors`, or shards
with `model.safetensors.index.json`; convert/safetensors_io.py reads either). Tensor mapping, with
torch's Linear weights [out, in] transposed to [in, out] and block i going to row i of the stacked
`layers` parameters:

    shared.weight (and/or its tied copy encoder.embed_tokens.weight)  -> embed [vocab, d_model]
    encoder.block.i.layer.0.layer_norm.weight                          -> layers/attn_norm/scale
    encoder.block.i.layer.0.SelfAttention.{q,k,v}.weight [H*Dk, D]     -> layers/attn/{q,k,v}/kernel [D, H, Dk]
    encoder.block.i.layer.0.SelfAttention.o.weight [D, H*Dk]           -> layers/attn/o/kernel [H, Dk, D]
    encoder.block.i.layer.0.SelfAttention.relative_attention_bias.weight -> layers/attn/rel_bias [buckets, H]
    encoder.block.i.layer.1.layer_norm.weight                          -> layers/ffn_norm/scale
    encoder.block.i.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight       -> layers/ffn/{wi_0,wi_1,wo}/kernel
    encoder.final_layer_norm.weight                                    -> final_norm/scale

Every tensor must land on a parameter of the same shape and every parameter must be filled; otherwise
ConversionError, one line naming the tensor. The two embedding names are one tied matrix in
transformers: either is accepted, and both only if they are equal.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from flax import traverse_util

from sora_jax.convert import safetensors_io
from sora_jax.convert.safetensors_io import ConversionError
from sora_jax.models import umt5 as umt5_lib

CONFIG_NAME = "config.json"
EMBED_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
FINAL_NORM = "encoder.final_layer_norm.weight"
# Per-block tensors: name after "encoder.block.i.layer." -> (parameter path, layout change).
#   heads_in:  [H*Dk, D] -> [D, H, Dk]     heads_out: [D, H*Dk] -> [H, Dk, D]
#   linear:    [out, in] -> [in, out]      same:      unchanged
BLOCK_TENSORS = {
    "0.layer_norm.weight": ("layers/attn_norm/scale", "same"),
    "0.SelfAttention.q.weight": ("layers/attn/q/kernel", "heads_in"),
    "0.SelfAttention.k.weight": ("layers/attn/k/kernel", "heads_in"),
    "0.SelfAttention.v.weight": ("layers/attn/v/kernel", "heads_in"),
    "0.SelfAttention.o.weight": ("layers/attn/o/kernel", "heads_out"),
    "0.SelfAttention.relative_attention_bias.weight": ("layers/attn/rel_bias", "same"),
    "1.layer_norm.weight": ("layers/ffn_norm/scale", "same"),
    "1.DenseReluDense.wi_0.weight": ("layers/ffn/wi_0/kernel", "linear"),
    "1.DenseReluDense.wi_1.weight": ("layers/ffn/wi_1/kernel", "linear"),
    "1.DenseReluDense.wo.weight": ("layers/ffn/wo/kernel", "linear"),
}
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.layer\.(.+)$")


def _source_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The transformers shape of a tensor that becomes a sora_jax parameter (one layer's) of `shape`."""
  if kind == "heads_in":
    d, h, k = shape
    return (h * k, d)
  if kind == "heads_out":
    h, k, d = shape
    return (d, h * k)
  if kind == "linear":
    return shape[::-1]
  return shape


def param_shapes(text_cfg) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape of every UMT5Encoder parameter (built abstractly, nothing allocated)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: umt5_lib.UMT5Encoder(text_cfg, rngs=nnx.Rngs(0)))
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def convert_tensors(tensors: dict[str, np.ndarray], text_cfg) -> dict:
  """UMT5Encoder parameters (float32 pure dict, layers stacked) from a UMT5EncoderModel state dict."""
  shapes = param_shapes(text_cfg)
  n = text_cfg["num_layers"]
  expected = {"embed", "final_norm/scale"} | {path for path, _ in BLOCK_TENSORS.values()}
  if expected != set(shapes):  # models/umt5.py changed its tree: this table must follow
    raise RuntimeError(f"UMT5Encoder's parameters {sorted(set(shapes) ^ expected)} are not in the mapping")
  out: dict[str, np.ndarray] = {}
  filled: set[tuple[str, int | None]] = set()

  def put(name, x, path, layer, kind):
    shape = shapes[path] if layer is None else shapes[path][1:]
    if tuple(x.shape) != _source_shape(kind, shape):
      raise ConversionError(f"tensor {name} is {list(x.shape)}; {path} needs "
                            f"{list(_source_shape(kind, shape))} (config and weights disagree)")
    y = np.asarray(x, np.float32)
    y = y.T.reshape(shape) if kind != "same" else y
    if layer is None:
      out[path] = y
    else:
      if path not in out:
        out[path] = np.zeros(shapes[path], np.float32)
      out[path][layer] = y
    filled.add((path, layer))

  for name, x in tensors.items():
    m = _BLOCK.match(name)
    if name in EMBED_NAMES:
      if ("embed", None) in filled:
        if tuple(x.shape) != out["embed"].shape or not np.array_equal(np.asarray(x, np.float32), out["embed"]):
          raise ConversionError(f"tensors {' and '.join(EMBED_NAMES)} differ; UMT5EncoderModel ties them "
                                "(one embedding), so a checkpoint may hold either or two equal copies")
        continue
      put(name, x, "embed", None, "same")
    elif name == FINAL_NORM:
      put(name, x, "final_norm/scale", None, "same")
    elif m and m.group(2) in BLOCK_TENSORS:
      layer = int(m.group(1))
      if layer >= n:
        raise ConversionError(f"tensor {name} is of block {layer}, but config num_layers={n}")
      path, kind = BLOCK_TENSORS[m.group(2)]
      put(name, x, path, layer, kind)
    else:
      raise ConversionError(f"tensor {name} has no place in UMT5Encoder (is this a UMT5EncoderModel "
                            "checkpoint? decoder and head tensors are not converted)")

  missing = [EMBED_NAMES[0]] if ("embed", None) not in filled else []
  missing += [FINAL_NORM] if ("final_norm/scale", None) not in filled else []
  missing += [f"encoder.block.{i}.layer.{suffix}" for suffix, (path, _) in BLOCK_TENSORS.items()
              for i in range(n) if (path, i) not in filled]
  if missing:
    raise ConversionError(f"{len(missing)} tensors are missing, first {missing[0]} (every UMT5Encoder "
                          "parameter needs one)")
  return traverse_util.unflatten_dict(out, sep="/")


def read_config(text_encoder_dir: str | os.PathLike, **overrides) -> dict:
  """The cfg.text section from the transformers config.json beside the weights (`overrides`: dtype, ...)."""
  src = Path(text_encoder_dir)
  path = (src if src.is_dir() else src.parent) / CONFIG_NAME
  if not path.is_file():
    raise ConversionError(f"{path}: no such file (the UMT5 encoder's transformers {CONFIG_NAME})")
  try:
    return umt5_lib.text_config(json.loads(path.read_text()), **overrides)
  except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
    raise ConversionError(f"{path}: {' '.join(str(e).split())}") from None


def convert(text_encoder_dir: str | os.PathLike, **overrides) -> tuple[dict, dict]:
  """(cfg.text section, UMT5Encoder parameters as a float32 pure dict) from a transformers directory.

  `text_encoder_dir`: the directory with config.json and the weights (or a weights file or index in
  it). `overrides` go to models/umt5.text_config (max_len, dtype, param_dtype, remat).
  """
  text_cfg = read_config(text_encoder_dir, **overrides)
  return text_cfg, convert_tensors(safetensors_io.read(text_encoder_dir), text_cfg)


def load(text_encoder_dir: str | os.PathLike, *, dtype: str = "bfloat16", **overrides):
  """(UMT5Encoder with the converted weights, its cfg.text section); matmuls in `dtype`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  text_cfg, params = convert(text_encoder_dir, dtype=dtype, **overrides)
  model = bundle_lib.build_model(lambda: umt5_lib.UMT5Encoder(text_cfg, rngs=nnx.Rngs(0)), params,
                                 what=str(text_encoder_dir))
  return model, text_cfg
