"""Checkpoints, optimizer and metrics shared by the trainers."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sora_jax import checkpoint, metrics, optim, sharding


class _CountingIter:
  """A stand-in data iterator with get_state/set_state, like the pipeline's."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return self.i

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def _state(mesh):
  w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("fsdp", "tensor")))
  return {"params": {"w": w, "b": jnp.ones(3)}, "step": jnp.int32(7)}


def test_save_restore_onto_other_mesh_with_iterator(tmp_path):
  mesh_a = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  mesh_b = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  state = _state(mesh_a)
  it = _CountingIter()
  for _ in range(5):
    next(it)
  mgr = checkpoint.Manager(str(tmp_path), max_to_keep=2)
  assert mgr.save(7, state, data_iter=it)
  next(it)  # the saved position is 5, whatever happens after save() returns
  mgr.close()

  mgr = checkpoint.Manager(str(tmp_path))
  assert mgr.latest_step() == 7
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  target["params"]["w"] = jax.ShapeDtypeStruct((8, 8), jnp.float32,
                                               sharding=NamedSharding(mesh_b, P("fsdp", None)))
  it2 = _CountingIter()
  out = mgr.restore(7, target, data_iter=it2)
  mgr.close()
  assert it2.i == 5
  np.testing.assert_array_equal(out["params"]["w"], np.arange(64.0).reshape(8, 8))
  assert out["params"]["w"].sharding.spec == P("fsdp", None)
  assert out["params"]["w"].sharding.mesh.shape["fsdp"] == 8
  assert int(out["step"]) == 7


def test_half_written_checkpoint_is_ignored(tmp_path):
  state = {"w": jnp.arange(4.0)}
  mgr = checkpoint.Manager(str(tmp_path))
  mgr.save(1, state)
  mgr.close()
  # What a save killed before orbax's final rename leaves behind.
  tmp = tmp_path / "2.orbax-checkpoint-tmp-1234567"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "garbage").write_text("partial")
  mgr = checkpoint.Manager(str(tmp_path))
  assert mgr.latest_step() == 1
  out = mgr.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  np.testing.assert_array_equal(out["w"], np.arange(4.0))
  mgr.close()


def test_save_interval_and_max_to_keep(tmp_path):
  mgr = checkpoint.Manager(str(tmp_path), max_to_keep=2, save_interval_steps=2)
  saved = [s for s in range(1, 8) if mgr.save(s, {"w": jnp.float32(s)})]
  assert mgr.save(7, {"w": jnp.float32(7)}, force=True)
  assert not mgr.save(7, {"w": jnp.float32(7)}, force=True)  # already saved: not again
  mgr.close()
  assert saved == [2, 4, 6]
  assert checkpoint.Manager(str(tmp_path)).all_steps() == [6, 7]


def _optim_cfg(**kw):
  c = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=4, schedule="cosine", end_lr_fraction=0.1,
                                     b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
  c.update(kw)
  return c


def test_schedule_warmup_then_cosine_floor():
  sched = optim.make_schedule(_optim_cfg(), total_steps=14)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(2)), 5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(4)), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(float(sched(14)), 1e-3, rtol=1e-5)
  const = optim.make_schedule(_optim_cfg(schedule="constant"), total_steps=14)
  np.testing.assert_allclose(float(const(13)), 1e-2, rtol=1e-6)
  with pytest.raises(ValueError, match="linear"):
    optim.make_schedule(_optim_cfg(schedule="linear"), total_steps=14)


def test_optimizer_clips_and_decays_matrices_only():
  tx = optim.make_optimizer(_optim_cfg(warmup_steps=0, schedule="constant", grad_clip=1.0), 10)
  # As the DiT's scanned blocks hold them: every leaf stacked on a leading `layers` axis, so a norm
  # scale or a bias is 2-D too (and a kernel 3-D).
  params = {"blocks": {"q": {"kernel": jnp.ones((3, 2, 2)), "bias": jnp.ones((3, 2))},
                       "norm": {"scale": jnp.ones((3, 2))}},
            "embed": jnp.ones((4, 2)), "null_text": jnp.ones(2)}
  opt_state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, opt_state, params)
  # Zero gradient: only weight decay moves anything, and only the weight matrices.
  np.testing.assert_allclose(updates["blocks"]["q"]["kernel"], -1e-2 * 0.1 * np.ones((3, 2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["embed"], -1e-2 * 0.1 * np.ones((4, 2)), rtol=1e-6)
  for unchanged in (updates["blocks"]["q"]["bias"], updates["blocks"]["norm"]["scale"], updates["null_text"]):
    np.testing.assert_array_equal(unchanged, np.zeros_like(unchanged))
  # A huge gradient is clipped to global norm 1 before Adam; Adam's first step is lr * sign anyway,
  # so check the clip through the clip transform alone.
  clipped, _ = optax.clip_by_global_norm(1.0).update({"g": jnp.full(4, 100.0)}, None)
  np.testing.assert_allclose(float(optax.global_norm(clipped)), 1.0, rtol=1e-6)


def test_ema_update():
  ema = {"w": jnp.zeros(3)}
  out = optim.ema_update(ema, {"w": jnp.ones(3)}, 0.9)
  np.testing.assert_allclose(out["w"], 0.1 * np.ones(3), rtol=1e-6)


def test_metric_writer_jsonl_and_video(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=True)
  w.write_scalars(1, {"loss": np.float32(2.5), "lr": jnp.float32(1e-3)})
  w.write_scalars(2, {"loss": float("nan")})
  path = w.write_video(2, "sample/0", np.zeros((3, 8, 8, 3), np.uint8))
  w.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[0] == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3)}
  assert lines[1] == {"step": 2, "loss": "nan"}
  assert os.path.getsize(path) > 0
  assert any(os.scandir(tmp_path / "tb"))
  off = metrics.MetricWriter(str(tmp_path / "other"), enabled=False)
  off.write_scalars(1, {"loss": 1.0})
  assert not os.path.exists(tmp_path / "other")
