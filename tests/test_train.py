"""The DiT trainer: sharded steps equal single-device steps, resume reproduces an uninterrupted run,
preemption saves, a non-finite loss stops without a bad checkpoint, resume precedence."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from sora_jax import checkpoint, diffusion, sharding, train
from sora_jax import config as config_lib
import train_fixtures as tf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_steps(cfg, devices, batches):
  mesh = sharding.mesh_from_config(cfg.mesh, devices)
  setup = train.make_setup(cfg, mesh)
  state = train.init_state(cfg, setup)
  compiled = train.compile_step(train.make_train_step(cfg, setup, diffusion.loss_fn), setup, batches[0],
                                mesh)
  losses = []
  for batch in batches:
    state, scalars = compiled(state, tf.to_global(batch, mesh))
    jax.block_until_ready(state)  # several fake devices: block every step (docs/hazards.md)
    losses.append(float(scalars["loss"]))
  return losses, jax.device_get(state), compiled


def test_sharded_step_matches_single_device():
  """2x2x2 (data x fsdp x tensor) on 8 fake devices vs 1 device, three steps, float32 compute.

  Tolerance: the sharded step sums partial products and gradients in a different order, so losses agree
  to 1e-5 relative and parameters after three AdamW steps to 1e-4 absolute (AdamW's normalised updates
  amplify rounding where a gradient entry is near zero); a wrong sharding or a missing reduction is off
  by orders of magnitude more.
  """
  cfg = tf.tiny_config()
  batches = [tf.synthetic_batch(i, cfg) for i in range(3)]
  loss8, state8, _ = _run_steps(cfg, jax.devices()[:8], batches)
  cfg1 = cfg.copy_and_resolve_references()
  cfg1.mesh.data = cfg1.mesh.fsdp = cfg1.mesh.tensor = 1
  loss1, state1, _ = _run_steps(cfg1, jax.devices()[:1], batches)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  assert loss8[0] != loss8[2]  # the steps did train
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), state8["params"],
               state1["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), state8["ema"],
               state1["ema"])
  assert int(state8["step"]) == 3


@pytest.mark.parametrize("mesh,batch,context", [
    (dict(data=1, fsdp=1, sequence=4, tensor=1), 1, "ulysses"),  # one row over 4 chips
    (dict(data=1, fsdp=2, sequence=4, tensor=1), 2, "ring"),     # 2 rows, 8 chips shard the parameters
])
def test_sequence_axis_step_matches_single_device(mesh, batch, context):
  """A `sequence` mesh axis (sharding.py) splits each row's tokens and, like fsdp, the parameters: a batch
  smaller than the devices sharding the parameters trains, and three steps equal one device's (the
  tolerances of test_sharded_step_matches_single_device)."""
  # 4 heads of 12: Ulysses splits the DiT's heads over 4 devices; the caption encoder's 2 heads take the
  # ring. 64-token rows: shards of 16 tokens, segments straddle them.
  cfg = tf.tiny_config(**{"data.batch_size": batch, "dit.width": 48, "dit.num_heads": 4,
                          "dit.attention": "auto", "dit.context": context})
  cfg.mesh = ml_collections.ConfigDict(mesh)
  devices = jax.devices()[:int(np.prod(list(mesh.values())))]
  train.check_config(cfg, devices, pipeline=False)
  batches = [tf.synthetic_batch(i, cfg) for i in range(3)]
  setup = train.make_setup(cfg, sharding.mesh_from_config(cfg.mesh, devices))
  q_spec = setup.shardings["params"]["blocks"]["attn"]["q"]["kernel"].spec
  assert q_spec == P(None, "sequence" if mesh["fsdp"] == 1 else ("fsdp", "sequence"), None, None)
  loss_n, state_n, compiled = _run_steps(cfg, devices, batches)
  # The rows really are split: the self-attention talks across the axis (no gathered fallback).
  assert {"ulysses": "all-to-all", "ring": "collective-permute"}[context] in compiled.as_text()
  cfg1 = cfg.copy_and_resolve_references()
  cfg1.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  cfg1.dit.context = "none"
  loss1, state1, _ = _run_steps(cfg1, jax.devices()[:1], batches)
  np.testing.assert_allclose(loss_n, loss1, rtol=1e-5)
  assert loss_n[0] != loss_n[2]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), state_n["params"],
               state1["params"])


def test_sequence_axis_needs_context_parallel_attention():
  cfg = tf.tiny_config(**{"data.batch_size": 1})
  cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, sequence=4, tensor=1))
  with pytest.raises(config_lib.ConfigError, match="config.dit.context='none': the mesh shards the "
                                                  "sequence over `sequence`"):
    train.check_config(cfg, jax.devices()[:4], pipeline=False)


def test_non_finite_loss_stops_and_saves_nothing_bad(tmp_path):
  # Also the periodic sample videos (latent previews of 3 channels here), written before the bad step.
  cfg = tf.tiny_config(**{"train.total_steps": 6, "train.checkpoint_every_steps": 1, "train.log_every_steps": 1,
                          "train.sample_every_steps": 2, "dit.in_dim": 12, "sample.steps": 2})
  data = (tf.SyntheticBatches(cfg, nan_at=3), tf.to_global)
  with pytest.raises(train.NonFiniteLoss, match="at step 3;"):
    train.train(cfg, str(tmp_path), data=data)
  mgr = checkpoint.Manager(str(tmp_path / "checkpoints"))
  assert mgr.all_steps() == [1, 2]
  mgr.close()
  logged = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
  assert max(logged) == 2
  assert sorted(os.listdir(tmp_path / "samples")) == [f"samples_latent_preview_{k}_00000002.gif" for k in (0, 1)]
  # The resolved config is saved beside the checkpoints, for export.
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["dit"]["width"] == cfg.dit.width and saved["train"]["total_steps"] == 6


def test_resume_precedence(tmp_path):
  cfg = tf.tiny_config()
  own_dir = tmp_path / "own" / "checkpoints"
  other = tmp_path / "other"
  for d, step in ((other / "checkpoints", 5),):
    m = checkpoint.Manager(str(d))
    m.save(step, {"w": jnp.zeros(2)}, force=True)
    m.close()
  own = checkpoint.Manager(str(own_dir))
  assert train.resolve_start(cfg, str(own_dir), own) == train.Start("scratch")
  cfg.train.init_from = str(other)
  assert train.resolve_start(cfg, str(own_dir), own) == train.Start(
      "init_from", str(other / "checkpoints"), 5)
  cfg.train.resume_from = str(other / "checkpoints")
  assert train.resolve_start(cfg, str(own_dir), own).kind == "resume_from"
  own.save(2, {"w": jnp.zeros(2)}, force=True)
  own.wait()
  assert train.resolve_start(cfg, str(own_dir), own) == train.Start("workdir", str(own_dir), 2)
  own.close()
  cfg.train.resume_from, cfg.train.init_from = str(tmp_path / "empty"), ""
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="holds no finished checkpoint"):
    train.resolve_start(cfg, str(tmp_path / "x"), checkpoint.Manager(str(tmp_path / "x")))


def _start(workdir, **overrides):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([_ROOT, os.path.join(_ROOT, "tests"), env.get("PYTHONPATH", "")])
  return subprocess.Popen([sys.executable, os.path.join(_ROOT, "tests", "train_fixtures.py"), str(workdir),
                           json.dumps(overrides)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(workdir, step, proc, timeout=600):
  t0 = time.time()
  while time.time() - t0 < timeout:
    steps = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()] if (
        workdir / "checkpoints").exists() else []
    if any(s >= step for s in steps):
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.2)
  raise TimeoutError(f"no checkpoint {step} in {workdir}")


def _final(workdir):
  cfg = tf.tiny_config()
  mesh = sharding.mesh_from_config(cfg.mesh)
  setup = train.make_setup(cfg, mesh)
  mgr = checkpoint.Manager(str(workdir / "checkpoints"))
  state = mgr.restore(mgr.latest_step(), setup.abstract_state)
  mgr.close()
  return jax.device_get(state)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise(tmp_path):
  """Killed (SIGKILL) after checkpoint 2, resumed to step 6: the same loss and parameters, bitwise, as
  one uninterrupted run (same program, same devices, step-folded rngs, restored data position)."""
  over = {"train.total_steps": 6, "train.checkpoint_every_steps": 2, "train.log_every_steps": 1}
  whole = tmp_path / "whole"
  p = _start(whole, **over)
  out = p.communicate(timeout=900)[0]
  assert p.returncode == 0, out

  killed = tmp_path / "killed"
  p = _start(killed, **over)
  _wait_for_checkpoint(killed, 2, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  p = _start(killed, **over)
  out = p.communicate(timeout=900)[0]
  assert p.returncode == 0, out
  assert "start: workdir (step" in out and "start: workdir (step 0)" not in out

  a, b = _final(whole), _final(killed)
  assert int(a["step"]) == int(b["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)
  rows = lambda w: {r["step"]: r["loss"] for r in map(json.loads, open(w / "metrics.jsonl")) if "loss" in r}
  assert rows(whole)[6] == rows(killed)[6]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  work = tmp_path / "w"
  p = _start(work, **{"train.total_steps": 10_000, "train.checkpoint_every_steps": 10_000,
                      "train.log_every_steps": 1})
  t0 = time.time()
  while not (work / "metrics.jsonl").exists() or sum(
      1 for l in open(work / "metrics.jsonl") if '"loss"' in l) < 2:
    assert p.poll() is None, p.stdout.read()
    assert time.time() - t0 < 600
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 0, out
  assert "SIGTERM: saved step" in out
  mgr = checkpoint.Manager(str(work / "checkpoints"))
  step = mgr.latest_step()
  mgr.close()
  assert step is not None and 2 <= step < 10_000
