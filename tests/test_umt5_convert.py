"""The UMT5 encoder and its converter without torch: position buckets, packing, the tensor mapping,
the shared safetensors reader (files, shards, directories) and its one-line errors.

These run in `make test`; equality with transformers itself is tests/test_umt5_interop.py.
"""
import json
from pathlib import Path

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from sora_jax.convert import safetensors_io
from sora_jax.convert import umt5 as convert_umt5
from sora_jax.convert import wan_vae
from sora_jax.models import umt5

# d_kv * num_heads != d_model, so a transposed attention weight cannot pass for the right one.
HF_CONFIG = dict(model_type="umt5", architectures=["UMT5EncoderModel"], vocab_size=50, d_model=16, d_kv=6,
                 d_ff=24, num_layers=2, num_heads=3, relative_attention_num_buckets=8,
                 relative_attention_max_distance=20, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
                 is_decoder=False)


def tiny_cfg(**overrides):
  return umt5.text_config(HF_CONFIG, max_len=32, dtype="float32", **overrides)


def test_buckets_by_hand():
  # 32 buckets: 16 per direction, distances 0-7 exact, then log-spaced up to 128, then the last.
  rel = [0, -1, 1, -7, 7, -8, -11, -12, -16, -20, 20, -32, -64, -127, -128, -1000, 1000]
  want = [0, 1, 17, 7, 23, 8, 8, 9, 10, 10, 26, 12, 14, 15, 15, 15, 31]
  np.testing.assert_array_equal(umt5.relative_position_buckets(np.array(rel), 32, 128), want)


def test_text_config_from_transformers():
  cfg = umt5.text_config(HF_CONFIG)
  assert list(cfg) == list(umt5.CONFIG_KEYS) and cfg["encoder"] == "umt5" and cfg["max_len"] == 512
  assert (cfg["dtype"], cfg["param_dtype"], cfg["remat"]) == ("bfloat16", "float32", "none")
  assert (cfg["d_model"], cfg["relative_attention_max_distance"]) == (16, 20)
  # UMT5Config's defaults fill what a config.json leaves out, as transformers does.
  no_defaults = {k: v for k, v in HF_CONFIG.items()
                 if not k.startswith("relative") and k != "layer_norm_epsilon"}
  cfg = umt5.text_config(no_defaults)
  assert (cfg["relative_attention_num_buckets"], cfg["relative_attention_max_distance"],
          cfg["layer_norm_epsilon"]) == (32, 128, 1e-6)
  for bad, match in (({"model_type": "t5"}, "model_type='t5'"), ({"feed_forward_proj": "relu"}, "relu"),
                     ({"is_decoder": True}, "is_decoder")):
    with pytest.raises(ValueError, match=match):
      umt5.text_config(dict(HF_CONFIG, **bad))
  with pytest.raises(ValueError, match=r"lacks \['d_ff'\]"):
    umt5.text_config({k: v for k, v in HF_CONFIG.items() if k != "d_ff"})


def random_encoder(cfg, seed=0):
  """A UMT5Encoder with random parameters everywhere (norm scales and position biases included)."""
  model = umt5.UMT5Encoder(cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
  params = {k: (rng.normal(size=v.shape) * (0.3 if k.endswith("scale") else 1.0)
                + (1.0 if k.endswith("scale") else 0.0)).astype(np.float32) for k, v in flat.items()}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(params, sep="/"))
  nnx.update(model, state)
  return model, params


def test_packed_captions_equal_each_alone_and_ignore_padding():
  cfg = tiny_cfg()
  model, _ = random_encoder(cfg)
  rng = np.random.default_rng(1)
  lengths = [5, 9, 3]
  captions = [rng.integers(3, 50, n).astype(np.int32) for n in lengths]
  row, seg = np.zeros((1, 24), np.int32), np.zeros((1, 24), np.int32)
  at = 2  # a row may begin with padding
  for s, c in enumerate(captions, start=1):
    row[0, at:at + len(c)], seg[0, at:at + len(c)] = c, s
    at += len(c)
  row[0, at:] = 7  # padding holds ids that must not matter
  packed = np.asarray(model(jnp.asarray(row), jnp.asarray(seg)))
  at = 2
  for c in captions:
    alone = np.asarray(model(jnp.asarray(c[None]), jnp.ones((1, len(c)), jnp.int32)))[0]
    np.testing.assert_allclose(packed[0, at:at + len(c)], alone, atol=1e-5, rtol=1e-5)
    at += len(c)
  assert np.isfinite(packed).all()  # padding positions too (they attend to nothing)
  assert np.abs(packed[0, 2:7] - packed[0, 7:12]).max() > 1e-2  # not vacuous


def as_transformers(params: dict, cfg) -> dict:
  """UMT5Encoder parameters named and laid out as transformers' UMT5EncoderModel state dict."""
  d, h, k = cfg["d_model"], cfg["num_heads"], cfg["d_kv"]
  out = {"shared.weight": params["embed"], "encoder.final_layer_norm.weight": params["final_norm/scale"]}
  for i in range(cfg["num_layers"]):
    p = lambda name: params[f"layers/{name}"][i]  # pylint: disable=cell-var-from-loop
    b = f"encoder.block.{i}.layer."
    out[b + "0.layer_norm.weight"] = p("attn_norm/scale")
    for name in "qkv":
      out[b + f"0.SelfAttention.{name}.weight"] = p(f"attn/{name}/kernel").reshape(d, h * k).T
    out[b + "0.SelfAttention.o.weight"] = p("attn/o/kernel").reshape(h * k, d).T
    out[b + "0.SelfAttention.relative_attention_bias.weight"] = p("attn/rel_bias")
    out[b + "1.layer_norm.weight"] = p("ffn_norm/scale")
    for name in ("wi_0", "wi_1", "wo"):
      out[b + f"1.DenseReluDense.{name}.weight"] = p(f"ffn/{name}/kernel").T
  return {name: np.ascontiguousarray(x) for name, x in out.items()}


def write_checkpoint(directory: Path, tensors: dict, *, shards: int = 1, config=HF_CONFIG) -> Path:
  """transformers' layout: config.json and model.safetensors, or `shards` files and an index."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  if shards == 1:
    save_file(tensors, str(directory / "model.safetensors"))
    return directory
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = names[s::shards]
    save_file({n: tensors[n] for n in part}, str(directory / file))
    weight_map.update({n: file for n in part})
  index = {"metadata": {}, "weight_map": weight_map}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  return directory


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_cfg()
  model, params = random_encoder(cfg)
  return {"cfg": cfg, "model": model, "params": params, "tensors": as_transformers(params, cfg)}


@pytest.mark.parametrize("layout", ["file", "sharded", "both_embeddings", "bf16"])
def test_conversion_is_exact(tiny, tmp_path, layout):
  tensors = dict(tiny["tensors"])
  if layout == "both_embeddings":
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()
  if layout == "bf16":
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  src = write_checkpoint(tmp_path / "text_encoder", tensors, shards=3 if layout == "sharded" else 1)
  cfg, params = convert_umt5.convert(src, max_len=32, dtype="float32")
  assert cfg == tiny["cfg"]
  got = traverse_util.flatten_dict(params, sep="/")
  assert set(got) == set(tiny["params"])
  for k, v in tiny["params"].items():
    want = v.astype(ml_dtypes.bfloat16).astype(np.float32) if layout == "bf16" else v
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], want, err_msg=k)


def test_loaded_encoder_runs_in_the_requested_dtype(tiny, tmp_path):
  src = write_checkpoint(tmp_path / "text_encoder", tiny["tensors"])
  ids = jnp.asarray(np.random.default_rng(2).integers(3, 50, (2, 12)), jnp.int32)
  seg = jnp.ones((2, 12), jnp.int32)
  want = np.asarray(tiny["model"](ids, seg))
  f32, cfg = convert_umt5.load(src, dtype="float32")
  assert cfg["dtype"] == "float32"
  np.testing.assert_array_equal(np.asarray(f32(ids, seg)), want)
  bf16, cfg = convert_umt5.load(src)
  assert cfg["dtype"] == "bfloat16"
  got = np.asarray(bf16(ids, seg))
  assert got.dtype == np.float32
  assert np.abs(got - want).max() < 0.1 * np.abs(want).max()  # bf16 matmuls: close, not equal
  leaves = jax.tree.leaves(nnx.state(bf16, nnx.Param))
  assert all(x.dtype == jnp.float32 for x in leaves)  # parameters stay in param_dtype


def _one_line_error(fn, match):
  with pytest.raises(safetensors_io.ConversionError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("case, match", [
    ("missing", r"missing, first encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"),
    ("missing_embedding", r"missing, first shared\.weight"),
    ("decoder", r"decoder\.block\.0\.layer\.0\.layer_norm\.weight has no place"),
    ("extra_block", r"block 2, but config num_layers=2"),
    ("transposed", r"SelfAttention\.q\.weight is \[16, 18\]; layers/attn/q/kernel needs \[18, 16\]"),
    ("embeddings_differ", r"shared\.weight and encoder\.embed_tokens\.weight differ"),
    ("no_config", r"config\.json: no such file"),
    ("t5_config", r"model_type='t5'"),
])
def test_bad_checkpoints_are_refused_in_one_line(tiny, tmp_path, case, match):
  tensors, config = dict(tiny["tensors"]), dict(HF_CONFIG)
  if case == "missing":
    del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  elif case == "missing_embedding":
    del tensors["shared.weight"]
  elif case == "decoder":
    tensors["decoder.block.0.layer.0.layer_norm.weight"] = np.ones(16, np.float32)
  elif case == "extra_block":
    tensors["encoder.block.2.layer.0.layer_norm.weight"] = np.ones(16, np.float32)
  elif case == "transposed":
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)
  elif case == "embeddings_differ":
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"] + 1
  elif case == "t5_config":
    config["model_type"] = "t5"
  src = write_checkpoint(tmp_path / "text_encoder", tensors, config=config)
  if case == "no_config":
    (src / "config.json").unlink()
  _one_line_error(lambda: convert_umt5.convert(src), match)


# ------------------------------------------------------------------------- the safetensors reader
def test_reader_keeps_dtypes_and_finds_the_checkpoint(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, ml_dtypes.bfloat16),
             "c": np.arange(3, dtype=np.int64)}
  save_file(tensors, str(tmp_path / "x.safetensors"))
  for path in (tmp_path / "x.safetensors", tmp_path):
    got = safetensors_io.read(path)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in tensors.items()}
    for k, v in tensors.items():
      np.testing.assert_array_equal(got[k], v)
  # wan_vae reads through it, as float32
  assert all(v.dtype == np.float32 for v in wan_vae.read_safetensors(tmp_path).values())


@pytest.mark.parametrize("case, match", [
    ("nothing", r"no such file or directory"),
    ("empty_dir", r"holds no \.safetensors file"),
    ("two_files", r"holds 2 checkpoints \(a\.safetensors, b\.safetensors\); give the file"),
    ("missing_shard", r"names shard model-00002-of-00002\.safetensors, which is missing"),
    ("absent_tensor", r"lists tensor t2 in shard model-00001-of-00002\.safetensors, which does not hold it"),
    ("unlisted_tensor", r"holds tensor t1, which model\.safetensors\.index\.json does not list"),
    ("bad_index", r"is not a safetensors index"),
    ("truncated", r"is not a readable safetensors file"),
])
def test_reader_errors_are_one_line(tmp_path, case, match):
  d = tmp_path / "ckpt"
  d.mkdir()
  t = {f"t{i}": np.full(3, i, np.float32) for i in range(3)}
  index = {"weight_map": {"t0": "model-00001-of-00002.safetensors", "t1": "model-00002-of-00002.safetensors",
                          "t2": "model-00002-of-00002.safetensors"}}
  if case in ("missing_shard", "absent_tensor", "unlisted_tensor", "bad_index"):
    save_file({"t0": t["t0"]}, str(d / "model-00001-of-00002.safetensors"))
    if case != "missing_shard":
      save_file({"t1": t["t1"], "t2": t["t2"]}, str(d / "model-00002-of-00002.safetensors"))
    if case == "absent_tensor":
      index["weight_map"]["t2"] = "model-00001-of-00002.safetensors"
    if case == "unlisted_tensor":
      del index["weight_map"]["t1"]
    text = "{not json" if case == "bad_index" else json.dumps(index)
    (d / "model.safetensors.index.json").write_text(text)
  elif case == "two_files":
    save_file(t, str(d / "a.safetensors"))
    save_file(t, str(d / "b.safetensors"))
  elif case == "truncated":
    save_file(t, str(d / "model.safetensors"))
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-5])
  _one_line_error(lambda: safetensors_io.read(tmp_path / "absent" if case == "nothing" else d), match)
