"""LoRA adapters (models/lora.py) and starting a run from a bundle (finetune.py), on tiny models without
torch: an untrained adapter is the base model exactly, merging equals the unmerged model, adapters are
sharded by the logical rules and only they train, a bundle's weights start a run exactly."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import finetune_fixtures as ff
import train_fixtures as tf
from sora_jax import diffusion, finetune, sharding, train
from sora_jax.models import lora
from sora_jax.models.dit import DiT

_call = nnx.jit(lambda model, *x: model(*x))
LORA = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, targets=lora.DEFAULT_TARGETS))


def _dit_cfg():
  return ff.umt5_bundle_config().dit


def _inputs(seed=0, b=2, l=24, lt=7, d=8, text_dim=16):
  rng = np.random.default_rng(seed)
  seg = np.repeat(np.array([[1] * 12 + [2] * 8 + [0] * 4]), b, 0).astype(np.int32)
  pos = np.zeros((b, l, 3), np.int32)
  pos[:, :12, 2], pos[:, 12:20, 2] = np.arange(12), np.arange(8)
  tseg = np.repeat(np.array([[1] * 4 + [2] * 3]), b, 0).astype(np.int32)
  return (jnp.asarray(rng.standard_normal((b, l, d)), jnp.float32), jnp.asarray(pos), jnp.asarray(seg),
          jnp.asarray(rng.uniform(size=(b, 2)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, lt, text_dim)), jnp.float32), jnp.asarray(tseg))


def _random_dit(seed=0):
  """A DiT whose zero-initialised parts (adaLN-Zero, output layer) are random too, so outputs move."""
  model = DiT(_dit_cfg(), rngs=nnx.Rngs(seed))
  nnx.update(model, ff.randomize_zeros(nnx.to_pure_dict(nnx.state(model, nnx.Param)), seed + 1))
  return model


def test_an_untrained_adapter_is_the_base_model_exactly():
  model = _random_dit()
  x = _inputs()
  before = _call(model, *x)
  assert float(jnp.abs(before).max()) > 0.1
  lora.apply(model, LORA, rngs=nnx.Rngs(5))
  adapters = nnx.to_pure_dict(nnx.state(model, lora.LoRAParam))
  assert sorted(adapters["blocks"]) == ["attn", "cross", "mlp"]
  assert sorted(adapters["blocks"]["attn"]) == ["k", "o", "q", "v"]
  a, b = adapters["blocks"]["attn"]["o"]["lora_a"], adapters["blocks"]["attn"]["o"]["lora_b"]
  assert a.shape == (2, 2, 16, 4) and b.shape == (2, 4, 32)  # [layers, heads, head_dim, r], [layers, r, W]
  assert float(jnp.abs(a).max()) > 0 and not b.any()
  np.testing.assert_array_equal(_call(model, *x), before)
  # The base parameters keep their paths: a plain DiT's weights load into the wrapped model unchanged.
  base, _ = lora.split_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  plain = nnx.to_pure_dict(nnx.state(_random_dit(), nnx.Param))
  assert jax.tree.structure(base) == jax.tree.structure(plain)


def test_merged_weights_equal_the_unmerged_adapter():
  model = lora.apply(_random_dit(), LORA, rngs=nnx.Rngs(5))
  adapters = nnx.to_pure_dict(nnx.state(model, lora.LoRAParam))
  keys = iter(jax.random.split(jax.random.key(9), 64))
  nnx.update(model, jax.tree.map(lambda v: 0.2 * jax.random.normal(next(keys), v.shape), adapters))
  x = _inputs(1)
  unmerged = _call(model, *x)
  base, adapters = lora.split_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  merged = lora.merge(base, adapters, lora.scale_of(LORA))
  plain = _random_dit()
  nnx.update(plain, merged)
  want = _call(plain, *x)
  assert float(jnp.abs(want - _call(_random_dit(), *x)).max()) > 1e-2  # the adapter changes the model
  np.testing.assert_allclose(unmerged, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="adapter for 'nope' has no projection"):
    lora.merge(base, {"nope": {"lora_a": 1, "lora_b": 1}}, 1.0)


def test_targets_pick_projections_by_path():
  model = lora.apply(_random_dit(), ml_collections.ConfigDict(dict(rank=2, alpha=0.0, targets=("blocks/mlp/up",
                                                                                               "blocks/*/q"))),
                     rngs=nnx.Rngs(0))
  got = nnx.to_pure_dict(nnx.state(model, lora.LoRAParam))
  assert {k: sorted(v) for k, v in got["blocks"].items()} == {"attn": ["q"], "cross": ["q"], "mlp": ["up"]}
  assert isinstance(model.blocks.mlp.up, lora.LoRADense) and model.blocks.mlp.up.lora_scale == 1.0
  with pytest.raises(ValueError, match=r"lora.targets pattern 'blocks/ffn/\*' matches no projection; the model "
                                       r"has \['blocks/attn/k'"):
    lora.apply(_random_dit(), ml_collections.ConfigDict(dict(rank=2, alpha=0.0, targets=("blocks/ffn/*",))),
               rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="lora.rank=99 for a projection of shape"):
    lora.apply(_random_dit(), ml_collections.ConfigDict(dict(rank=99, alpha=0.0, targets=("blocks/mlp/up",))),
               rngs=nnx.Rngs(0))


def _train_cfg(rank=4):
  cfg = tf.tiny_config()
  cfg.dit = _dit_cfg()
  cfg.data.text_len = 16
  cfg.dit.vocab_size = 32  # synthetic_batch draws caption ids (replaced by features in _feature_batch)
  cfg.lora = ml_collections.ConfigDict(dict(rank=rank, alpha=float(rank), targets=lora.DEFAULT_TARGETS))
  cfg.train.optim.lr = 1e-2
  cfg.data.latents_dir = ""  # no latent data set: the demo's (runs/demo, where one was made) is not this run's
  return cfg


def _feature_batch(i, cfg):
  batch = tf.synthetic_batch(i, cfg)
  rng = np.random.default_rng(100 + i)
  feats = rng.standard_normal(batch["text_tokens"].shape + (cfg.dit.text_dim,)).astype(np.float32)
  batch["text_tokens"] = feats * (batch["text_segment_ids"] > 0)[..., None]
  return batch


@pytest.mark.slow
def test_lora_state_is_sharded_by_the_logical_rules_and_only_adapters_train():
  cfg = _train_cfg()
  cfg.dit.width, cfg.dit.ffn_dim = 64, 128  # divisible by the mesh axes
  mesh = sharding.mesh_from_config(cfg.mesh, jax.devices()[:8])  # data 2 x fsdp 2 x tensor 2
  setup = train.make_setup(cfg, mesh)
  full = ml_collections.ConfigDict(cfg.to_dict())
  full.lora.rank = 0
  full_setup = train.make_setup(full, mesh)
  sh = setup.shardings
  # The frozen base is laid out exactly as full training lays out the parameters.
  spec = lambda t: jax.tree.map(lambda s: s.spec, t)
  assert spec(sh["frozen"]) == spec(full_setup.shardings["params"])
  q = sh["params"]["blocks"]["attn"]["q"]
  assert q["lora_a"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # [layers, embed, r]
  assert q["lora_b"].spec == jax.sharding.PartitionSpec(None, None, "tensor", None)  # [layers, r, heads, hd]
  assert sh["params"]["blocks"]["mlp"]["down"]["lora_a"].spec == jax.sharding.PartitionSpec(None, "tensor", None)
  # Optimizer state and EMA only for the adapters; checkpoints leave the base out.
  adapter_shapes = jax.tree.map(lambda a: a.shape, setup.abstract_state["params"])
  mu = setup.abstract_state["opt_state"][-1][0].mu
  assert jax.tree.map(lambda a: a.shape, mu) == adapter_shapes
  assert setup.num_params < 0.2 * setup.num_frozen
  assert "frozen" not in finetune.trained(setup.abstract_state)

  state = train.init_state(cfg, setup)
  # A base whose blocks matter (from scratch, adaLN-Zero gates and the zero output layer pass no gradient).
  state["frozen"] = jax.device_put(ff.randomize_zeros(jax.device_get(state["frozen"])), sh["frozen"])
  base0 = jax.device_get(state["frozen"])
  step = train.compile_step(train.make_train_step(cfg, setup, diffusion.loss_fn), setup, _feature_batch(0, cfg),
                            mesh)
  losses = []
  for i in range(4):
    state, scalars = step(state, tf.to_global(_feature_batch(i % 2, cfg), mesh))
    jax.block_until_ready(state)  # several fake devices: block every step (docs/hazards.md)
    losses.append(float(scalars["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["frozen"]), base0)
  b = jax.device_get(state["params"]["blocks"]["mlp"]["up"]["lora_b"])
  assert np.abs(b).max() > 0  # B left zero: the adapters did train
  assert np.isfinite(losses).all()


def test_a_run_starts_from_a_bundle_exactly(tmp_path):
  from sora_jax import bundle as bundle_lib
  path = ff.umt5_bundle(tmp_path / "bundle")
  stored = bundle_lib.load_parts(path)[1]
  stored.pop("text")
  mesh = sharding.mesh_from_config(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=1)), jax.devices()[:2])
  for rank in (0, 4):
    cfg = _train_cfg(rank)
    cfg.train.init_from = str(path)
    setup = train.make_setup(cfg, mesh)
    state = train.init_state(cfg, setup, weights=finetune.bundle_weights(cfg, setup, path))
    got = jax.device_get(state["frozen"] if rank else state["params"])
    jax.tree.map(np.testing.assert_array_equal, got, stored)
    if rank:
      assert not jax.device_get(state["params"]["blocks"]["attn"]["q"]["lora_b"]).any()
    else:
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["ema"]), stored)
  cfg = _train_cfg(0)
  cfg.dit.ffn_dim = 48
  with pytest.raises(ValueError, match=r"config.dit.ffn_dim=48 but bundle .* has dit.ffn_dim=64"):
    finetune.check_config(cfg, path)
  # Latents normalised otherwise than the bundle's DiT expects are refused.
  ff.latent_dataset(tmp_path / "latents")
  cfg = _train_cfg(0)
  cfg.data.latents_dir = str(tmp_path / "latents")
  finetune.check_latent_stats(cfg, path, None)
  (tmp_path / "latents" / "latent_stats.json").write_text('{"shift": [0.5, 0.0], "scale": [1.0, 1.0]}')
  with pytest.raises(ValueError, match="normalised differently from bundle .*--latent_stats=bundle"):
    finetune.check_latent_stats(cfg, path, None)


def test_lora_config_mistakes_are_one_line_before_anything_runs(tmp_path):
  from sora_jax import config as config_lib
  cfg = _train_cfg()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  train.check_config(cfg, jax.devices()[:1], pipeline=False)
  for key, value, match in (("lora.rank", -1, r"config.lora.rank=-1: must be >= 0"),
                            ("train.init_from", str(tmp_path),
                             r"config.train.init_from=.*: a LoRA run's base must be a bundle"),
                            ("lora.targets", ("blocks/nope",), r"config.lora.targets pattern 'blocks/nope' matches")):
    bad = _train_cfg()
    bad.mesh.data, bad.mesh.fsdp, bad.mesh.tensor = 1, 1, 1
    node, *path = key.split(".")
    (bad[node] if path else bad).__setitem__(path[0] if path else node, value)
    with pytest.raises(config_lib.ConfigError, match=match):
      train.check_config(bad, jax.devices()[:1], pipeline=False)
