"""The Wan 2.1 VAE converter without torch: layout mapping, architecture inference, the written run.

These run in `make test` (no interop extra), so a change to models/vae.py's parameter tree that the
converter does not follow fails here; equality with diffusers itself is tests/test_wan_interop.py.
"""
import json
import struct
from pathlib import Path

from flax import nnx
import jax
import ml_dtypes
import numpy as np
import pytest

from sora_jax import bundle as bundle_lib
from sora_jax.convert import wan_vae
from sora_jax.models import vae as vae_lib

TINY = dict(base_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, z_dim=4, temporal_downsample=(False, True))
# AutoencoderKLWan() (diffusers 0.42.1) holds 126,892,531 parameters in 194 tensors.
WAN21_PARAMS, WAN21_TENSORS = 126_892_531, 194


def write_safetensors(path: Path, tensors: dict, dtype: str = "F32") -> None:
  np_dtype = {"F32": np.float32, "BF16": ml_dtypes.bfloat16}[dtype]
  header, blobs, offset = {}, [], 0
  for name, x in tensors.items():
    blob = np.ascontiguousarray(x, np_dtype).tobytes()
    header[name] = {"dtype": dtype, "shape": list(x.shape), "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  head = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def diffusers_name(path: str) -> str:
  """The inverse of wan_vae.sora_path (what diffusers would call a sora_jax parameter)."""
  parts = path.split("/")
  if parts[-1] == "kernel":
    parts[-1] = "weight"
  if len(parts) >= 2 and parts[-2] == "resample":
    parts.insert(-1, "1")
  return ".".join(parts)


def diffusers_tensor(path: str, x: np.ndarray) -> np.ndarray:
  if path.endswith("kernel") and x.ndim == 5:
    return x.transpose(4, 3, 0, 1, 2)
  if path.endswith("kernel") and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)
  if path.endswith("gamma"):
    return x.reshape(-1, 1, 1, 1)
  return x


def as_diffusers(settings) -> tuple[dict, dict]:
  """(random sora_jax parameters as a flat dict, the same tensors named and laid out as diffusers')."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: vae_lib.VAE(settings, rngs=nnx.Rngs(0)))
  flat = dict(wan_vae._flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat.items()}
  return params, {diffusers_name(k): diffusers_tensor(k, v) for k, v in params.items()}


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_round_trip_through_a_safetensors_file_is_exact(tmp_path, dtype):
  s = vae_lib.settings(TINY)
  params, tensors = as_diffusers(s)
  write_safetensors(tmp_path / wan_vae.FILE_NAME, tensors, dtype)
  read = wan_vae.read_safetensors(tmp_path / wan_vae.FILE_NAME)
  assert set(read) == set(tensors) and all(x.dtype == np.float32 for x in read.values())
  assert wan_vae.infer_settings(read) == s
  got = dict(wan_vae._flatten(wan_vae.convert(read, s)))  # pylint: disable=protected-access
  assert set(got) == set(params)
  for k, v in params.items():
    want = v.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "BF16" else v
    np.testing.assert_array_equal(got[k], want, err_msg=k)


@pytest.mark.parametrize("damage", ["truncated", "not_json", "too_short"])
def test_damaged_files_are_refused_in_one_line(tmp_path, damage):
  path = tmp_path / wan_vae.FILE_NAME
  write_safetensors(path, as_diffusers(vae_lib.settings(TINY))[1])
  blob = path.read_bytes()
  blob = {"truncated": blob[:-100], "not_json": blob[:8] + b"\xff" * (len(blob) - 8),
          "too_short": blob[:5]}[damage]
  path.write_bytes(blob)
  with pytest.raises(wan_vae.ConversionError, match="safetensors file|truncated") as e:
    wan_vae.read_safetensors(path)
  assert "\n" not in str(e.value)


def test_converted_run_loads_like_a_trained_vae(tmp_path):
  s = vae_lib.settings(dict(TINY, decoder_base_dim=8))
  params, tensors = as_diffusers(s)
  (tmp_path / "in").mkdir()
  write_safetensors(tmp_path / "in" / wan_vae.FILE_NAME, tensors)
  record = wan_vae.run(tmp_path / "in", tmp_path / "vae")
  assert record["diffusers_config"] is None and record["vae"]["decoder_base_dim"] == 8
  restored, step, key = bundle_lib.restore_ema(tmp_path / "vae")
  assert (step, key) == (0, "ema")
  cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
  vae = bundle_lib.build_model(lambda: vae_lib.VAE(cfg["vae"], rngs=nnx.Rngs(0)), restored, what="vae")
  got = dict(wan_vae._flatten(nnx.to_pure_dict(nnx.state(vae, nnx.Param))))  # pylint: disable=protected-access
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)
  stats = json.loads((tmp_path / "vae" / "latent_stats.json").read_text())
  assert stats["shift"] == [0.0] * 4 and stats["scale"] == [1.0] * 4 and "identity" in stats["source"]


def test_diffusers_config_that_disagrees_is_refused():
  s = vae_lib.settings(TINY)
  wan_vae.check_diffusers_config({"base_dim": 4, "z_dim": 4, "temperal_downsample": [False, True]}, s)
  for bad, match in (({"base_dim": 8}, "base_dim=8"), ({"is_residual": True}, "Wan 2.2"),
                     ({"patch_size": 2}, "patch_size"), ({"attn_scales": [0.5]}, "attn_scales"),
                     ({"temperal_downsample": [True, True]}, "temperal_downsample"),
                     ({"decoder_base_dim": 8}, "decoder_base_dim")):
    with pytest.raises(wan_vae.ConversionError, match=match):
      wan_vae.check_diffusers_config(bad, s)


def test_wan21_config_has_diffusers_parameter_count():
  """experiments/wan21_vae.py builds exactly the tensors of diffusers' AutoencoderKLWan()."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = Path(__file__).resolve().parent.parent
  spec = importlib.util.spec_from_file_location("wan21_vae", root / "experiments" / "wan21_vae.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  s = vae_lib.settings(module.get_config().vae)
  assert (s.temporal_factor, s.spatial_factor, s.z_dim) == (4, 8, 16)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: vae_lib.VAE(s, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert (len(leaves), sum(int(np.prod(x.shape)) for x in leaves)) == (WAN21_TENSORS, WAN21_PARAMS)
  assert len(wan_vae.latent_stats(None, s)["shift"]) == 16
